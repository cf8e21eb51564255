"""Replay a saturated offline run through the real Scheduler on the CPU, timed by a model of the
GPU's step times instead of a GPU: what a scheduling choice (--schedule-policy,
--schedule-conservativeness, chunk size, --enable-mixed-chunk, the KV pool) does to a run's
length, step counts, retractions and first-token times, for a minute of CPU instead of device
time.

    python -m meshserve.bench.schedule_replay --num-prompts 500 --random-input-len 4096 \\
        --random-output-len 2048 --random-range-ratio 0 --max-total-tokens 844941 \\
        --decode-step-ms 4.94 --decode-ms-per-100k-kv 3.752 --prefill-tokens-per-s 35986 \\
        [launch_server flags, e.g. --schedule-policy lof]

The step-time model: a decode step costs --decode-step-ms plus --decode-ms-per-100k-kv per 100k
tokens of context its sequences read; an extend step costs its prompt tokens at
--prefill-tokens-per-s, plus the context reads of the running sequences a mixed step carries.
Fit the decode constants to a real run's --step-trace-file with `python -m
meshserve.bench.step_trace` (its "decode step fit" line). A retracted request is re-admitted
through the real scheduler, so what it computes again (all of its sequence that the prefix cache
no longer holds) is charged at the prefill rate like any prompt; the report counts retractions
and those tokens. The flat rate is an average over the run's prompts: it does not charge a
recompute's attention over its longer context, nor a fixed cost per step. Lengths are drawn as
bench_offline_throughput draws them for the same seed; prompts are random ids. Scheduling follows
the GPU's defaults (overlap, 8,192-token chunks, no mixed chunks unless asked), as on the GPU.
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from meshserve.bench.datasets import RANGE_RATIO_HELP, sample_lengths
from meshserve.cache.kv_pool import KVPool, ReqToTokenPool
from meshserve.cluster.groups import ParallelGroups
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.executor.forward_batch import ForwardMode
from meshserve.executor.model_runner import StepInput, max_running_requests
from meshserve.messages import GenerateReq
from meshserve.sampling_params import SamplingParams
from meshserve.scheduler.scheduler import Scheduler

VOCAB = 1000  # prompt ids are drawn below it; the replayed "model" always answers token 1


@dataclass(frozen=True)
class StepCosts:
    decode_step_ms: float
    decode_ms_per_100k_kv: float
    prefill_tokens_per_s: float

    def seconds(self, step: StepInput) -> float:
        """The modeled device time of one step."""
        if step.mode is ForwardMode.DECODE:
            return (self.decode_step_ms + self.decode_ms_per_100k_kv * sum(step.seq_lens) / 1e5) / 1e3
        # A mixed step's running sequences are one-token extends over their whole context.
        prompt_tokens = sum(n for n in step.extend_lens if n > 1)
        carried_context = sum(s for n, s in zip(step.extend_lens, step.seq_lens) if n == 1)
        return prompt_tokens / self.prefill_tokens_per_s + self.decode_ms_per_100k_kv * carried_context / 1e8


@dataclass
class ReplayRunner:
    """The runner interface the Scheduler drives, with a clock in place of a model."""

    costs: StepCosts
    kv_pool: KVPool
    req_to_token: ReqToTokenPool
    max_running_requests: int
    device: torch.device = torch.device("cpu")
    groups: ParallelGroups = field(default_factory=ParallelGroups.single)
    dp_attention: bool = False
    idle_forwards: int = 0
    clock: float = 0.0
    steps: Counter = field(default_factory=Counter)
    forwarded_tokens: int = 0  # every token every step computed: prompts, decodes, recomputes

    def forward(self, step: StepInput) -> torch.Tensor:
        self.clock += self.costs.seconds(step)
        self.forwarded_tokens += sum(step.extend_lens)
        mixed = step.mode is ForwardMode.EXTEND and 1 in step.extend_lens
        self.steps["decode" if step.mode is ForwardMode.DECODE else "mixed" if mixed else "prefill"] += 1
        logits = torch.zeros(len(step.req_rows), VOCAB)
        logits[:, 1] = 1.0
        return logits

    def idle_step(self) -> None:
        """No DP attention here: nothing to join."""

    def expert_load(self) -> None:
        return None

    def record_tokens(self, token_ids: torch.Tensor, among: torch.Tensor | None = None) -> None:
        """The replay's decode steps need no input tokens."""


@dataclass
class Replay:
    seconds: float
    output_tokens: int
    steps: Counter
    queue_empty_at: float
    first_token_s: list[float]
    retractions: int
    # Tokens computed again after retractions (their KV was freed or evicted meanwhile); the
    # step-time model charges them as prompt tokens of the steps that re-admit their requests.
    recomputed_tokens: int

    def report(self) -> str:
        ttft = np.array(self.first_token_s)
        steps = ", ".join(f"{kind} {n}" for kind, n in sorted(self.steps.items()))
        return (f"modeled {self.seconds:.1f} s, {self.output_tokens} output tokens, "
                f"{self.output_tokens / self.seconds:.0f} output tok/s; steps: {steps}; retractions "
                f"{self.retractions} ({self.recomputed_tokens} tokens recomputed); queue empty at "
                f"{self.queue_empty_at:.1f} s; first token median {np.median(ttft):.1f} s, "
                f"p90 {np.percentile(ttft, 90):.1f} s, p99 {np.percentile(ttft, 99):.1f} s")


def replay(args: ServerArgs, costs: StepCosts, prompts: list[list[int]], output_lens: list[int],
           context_length: int) -> Replay:
    """Every request submitted at t = 0; step until all have finished."""
    pool_size = args.cache.max_total_tokens
    if pool_size is None:
        raise ValueError("the replay needs --max-total-tokens: the GPU run's KV pool ('KV cache: N tokens' in its log)")
    max_running = max_running_requests(args, pool_size)
    runner = ReplayRunner(
        costs, KVPool(size=pool_size, num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float32,
                      device=torch.device("cpu"), page_size=args.cache.page_size),
        ReqToTokenPool(max_requests=max_running, max_context=context_length + 1, device=torch.device("cpu")),
        max_running)
    config = ModelConfig(model_path="replay", tokenizer_path=None, served_model_name="replay", architecture="replay",
                         dtype="bfloat16", context_length=context_length, vocab_size=VOCAB, eos_token_ids=(0,),
                         hf_config=None)  # type: ignore[arg-type]
    scheduler = Scheduler(args, config, runner, defaults_of="cuda")  # type: ignore[arg-type]
    for i, (prompt, n) in enumerate(zip(prompts, output_lens)):
        sampling = SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True)
        scheduler.add_request(GenerateReq(rid=str(i), input_ids=prompt, sampling=sampling))
    first: dict[str, float] = {}
    produced = 0
    queue_empty_at = None
    while scheduler.has_work:
        scheduler.step()
        if queue_empty_at is None and not scheduler.waiting and scheduler.chunked is None:
            queue_empty_at = runner.clock
        for out in scheduler.take_outputs():
            produced += len(out.new_ids)
            first.setdefault(out.rid, runner.clock)
    # Each request's prompt (less its cache hit) yields its first token and each further token
    # costs one forwarded token, so whatever was forwarded beyond that was computed twice: a
    # re-admission extends from its cached prefix up to its newest token, of which only the
    # newest would have been decoded anyway. (Exact while no token is discarded: no aborts, and
    # ignore_eos, so no in-flight step runs past a stop.)
    recomputed = runner.forwarded_tokens - scheduler.stats["prompt_tokens"] - (produced - len(first))
    return Replay(runner.clock, produced, runner.steps, queue_empty_at or 0.0, list(first.values()),
                  scheduler.stats["num_retracted"], recomputed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--random-input-len", type=int, default=4096)
    parser.add_argument("--random-output-len", type=int, default=2048)
    parser.add_argument("--random-range-ratio", type=float, default=0.0, help=RANGE_RATIO_HELP)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--context-length", type=int, default=8192)
    parser.add_argument("--decode-step-ms", type=float, required=True)
    parser.add_argument("--decode-ms-per-100k-kv", type=float, required=True)
    parser.add_argument("--prefill-tokens-per-s", type=float, required=True)
    ns, extra = parser.parse_known_args(argv)
    # Any launch_server flag may follow (--schedule-policy, --chunked-prefill-size, ...).
    args = ServerArgs.parse_args(["--model-path", "replay", "--device", "cpu", *extra])
    rng = np.random.default_rng(ns.seed)
    input_lens = sample_lengths(rng, ns.random_input_len, ns.random_range_ratio, ns.num_prompts)
    output_lens = sample_lengths(rng, ns.random_output_len, ns.random_range_ratio, ns.num_prompts)
    prompts = [rng.integers(1, VOCAB, int(n)).tolist() for n in input_lens]
    costs = StepCosts(ns.decode_step_ms, ns.decode_ms_per_100k_kv, ns.prefill_tokens_per_s)
    try:
        print(replay(args, costs, prompts, output_lens.tolist(), ns.context_length).report())
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
