"""Offline throughput through the in-process engine, after SGLang's bench_offline_throughput:
random token-id prompts (SGLang's --random-range-ratio semantics), every request submitted at
once (request rate infinite), ignore_eos, greedy. Each request is streamed, so the report also
gives the first-token times under that load (from the common start; median, p90, p99), the
figure a saturated server's clients wait for.

  python -m meshserve.bench_offline_throughput --model-path DIR --num-prompts 500 \\
      --random-input-len 4096 --random-output-len 2048 --random-range-ratio 0
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

import numpy as np

from meshserve.bench.datasets import RANGE_RATIO_HELP, sample_lengths


@dataclass(frozen=True)
class OfflineRun:
    duration_s: float
    first_token_s: list[float]  # per request, from the start of the run
    output_tokens: int


async def run_offline(args, prompts: list[list[int]], params: list[dict]) -> OfflineRun:
    """Start an engine with `args` (ServerArgs), warm it up, then submit every prompt at once and
    stream each to its end."""
    from meshserve.engine import AsyncEngine

    engine = await AsyncEngine.create(args=args)
    try:
        await engine.complete(input_ids=[prompts[0][:16]], sampling_params=[{"max_new_tokens": 4}])  # warm-up
        start = time.perf_counter()

        async def one(ids: list[int], sampling: dict) -> tuple[float, int]:
            first, tokens = None, 0
            async for out in engine.generate(input_ids=ids, sampling_params=sampling):
                if first is None and out.token_ids:
                    first = time.perf_counter() - start
                tokens += len(out.token_ids)
            assert first is not None, "a request finished without a token"
            return first, tokens

        done = await asyncio.gather(*(one(ids, sampling) for ids, sampling in zip(prompts, params)))
        return OfflineRun(time.perf_counter() - start, [first for first, _ in done], sum(n for _, n in done))
    finally:
        await engine.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument("--random-input-len", type=int, default=4096)
    parser.add_argument("--random-output-len", type=int, default=2048)
    parser.add_argument("--random-range-ratio", type=float, default=0.0, help=RANGE_RATIO_HELP)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output-file")
    ns, extra = parser.parse_known_args(argv)

    from meshserve.config.model_config import ModelConfig
    from meshserve.config.server_args import ServerArgs

    # Any launch_server flag may follow (e.g. --mem-fraction-static 0.85 --cuda-graph-max-bs 256).
    args = ServerArgs.parse_args(["--model-path", ns.model_path, "--skip-tokenizer-init", *extra]).validate()
    rng = np.random.default_rng(ns.seed)
    input_lens = sample_lengths(rng, ns.random_input_len, ns.random_range_ratio, ns.num_prompts)
    output_lens = sample_lengths(rng, ns.random_output_len, ns.random_range_ratio, ns.num_prompts)
    vocab = ModelConfig.from_server_args(args).vocab_size
    prompts = [rng.integers(0, vocab, int(n)).tolist() for n in input_lens]
    params = [{"max_new_tokens": int(n), "ignore_eos": True, "temperature": 0} for n in output_lens]
    run = asyncio.run(run_offline(args, prompts, params))
    duration, out_tokens, ttft = run.duration_s, run.output_tokens, np.array(run.first_token_s)
    report = {"num_prompts": ns.num_prompts, "input_tokens": int(input_lens.sum()), "output_tokens": out_tokens,
              "duration_s": duration, "request_throughput": ns.num_prompts / duration,
              "output_throughput": out_tokens / duration,
              "total_throughput": (int(input_lens.sum()) + out_tokens) / duration,
              "random_range_ratio": ns.random_range_ratio,
              **{f"{name}_ttft_s": float(np.percentile(ttft, q)) for name, q in (("median", 50), ("p90", 90),
                                                                                 ("p99", 99))}}
    print(f"Offline: {ns.num_prompts} prompts, input {report['input_tokens']} tokens, output {out_tokens} tokens, "
          f"range ratio {ns.random_range_ratio} (SGLang semantics)")
    print(f"Duration {duration:.1f} s; output throughput {report['output_throughput']:.0f} tok/s "
          f"(output tokens / wall time); total {report['total_throughput']:.0f} tok/s; "
          f"{report['request_throughput']:.2f} req/s")
    print(f"First token: median {report['median_ttft_s']:.2f} s, p90 {report['p90_ttft_s']:.2f} s, "
          f"p99 {report['p99_ttft_s']:.2f} s (every request submitted at the start)")
    if ns.output_file:
        with open(ns.output_file, "a") as f:
            f.write(json.dumps(report) + "\n")


if __name__ == "__main__":
    main()
