"""A model-free stand-in for ModelRunner, so the real Scheduler can be tested in milliseconds.

The fake "model" reads its context the way attention does: through the request-to-token table
and the KV slots. Each step stores every new token's id in its slot, and the next token is a
hash of the ids found in the slots of the sequence's row. So a scheduler that hands out a wrong
prefix, reuses a live slot, or points a row at the wrong slots changes the output, exactly as
it would with a real model, while the expected output is a plain loop (`expected_output`).
"""

from __future__ import annotations

import torch

from meshserve.cache.kv_pool import KVPool, ReqToTokenPool
from meshserve.cluster.groups import ParallelGroups
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.executor.forward_batch import ForwardMode
from meshserve.executor.model_runner import StepInput
from meshserve.scheduler.scheduler import Scheduler
from tests.scheduler_driver import track

VOCAB = 97
EOS = 0  # never produced by next_token, so only max_new_tokens ends a sequence
CONTEXT = 512


def next_token(context: list[int]) -> int:
    """The fake model: any change to any context token (or its position) changes the answer."""
    h = 0
    for i, t in enumerate(context):
        h = (h * 31 + t * (i + 7)) % 1_000_003
    return 1 + h % (VOCAB - 1)


def expected_output(prompt: list[int], max_new_tokens: int) -> list[int]:
    seq = list(prompt)
    for _ in range(max_new_tokens):
        seq.append(next_token(seq))
    return seq[len(prompt):]


class FakeRunner:
    def __init__(self, max_total_tokens: int, max_running_requests: int, page_size: int) -> None:
        self.device = torch.device("cpu")
        self.groups = ParallelGroups.single()
        self.dp_attention = False
        self.idle_forwards = 0
        self.max_running_requests = max_running_requests
        self.kv_pool = KVPool(size=max_total_tokens, num_layers=1, num_kv_heads=1, head_dim=1,
                              dtype=torch.float32, device=self.device, page_size=page_size)
        self.req_to_token = ReqToTokenPool(max_requests=max_running_requests, max_context=CONTEXT + 1,
                                           device=self.device)
        self.token_in_slot = torch.full((self.kv_pool.k[0].shape[0],), -1, dtype=torch.int64)
        self.last_tokens = torch.zeros(max_running_requests, dtype=torch.int64)
        self._step_rows: torch.Tensor | None = None

    def forward(self, step: StepInput) -> torch.Tensor:
        rows = torch.tensor(step.req_rows, dtype=torch.int64)
        positions = torch.tensor(step.positions, dtype=torch.int64)
        if step.mode is ForwardMode.DECODE:
            token_rows, new_ids = rows, self.last_tokens[rows]
        else:
            token_rows = torch.repeat_interleave(rows, torch.tensor(step.extend_lens))
            new_ids = torch.tensor(step.input_ids, dtype=torch.int64)
        assert (step.out_cache_loc >= self.kv_pool.page_size).all(), "page 0 is reserved for padding"
        self.req_to_token.table[token_rows, positions] = step.out_cache_loc
        self.token_in_slot[step.out_cache_loc] = new_ids
        self._step_rows = rows
        logits = torch.zeros(len(step.req_rows), VOCAB)
        for i, (row, seq_len) in enumerate(zip(step.req_rows, step.seq_lens)):
            context = self.token_in_slot[self.req_to_token.table[row, :seq_len]].tolist()
            assert -1 not in context, "attention would read a slot nobody wrote"
            logits[i, next_token(context)] = 10.0
        return logits

    def idle_step(self) -> None:
        """A step without a forward: no DP attention and no MoE layers, so nothing to join or gather."""

    def expert_load(self) -> None:
        return None  # no MoE layers

    def record_tokens(self, token_ids: torch.Tensor, among: torch.Tensor | None = None) -> None:
        assert self._step_rows is not None
        rows = self._step_rows if among is None else self._step_rows.index_select(0, among)
        self.last_tokens.index_copy_(0, rows, token_ids)


def fake_scheduler(*extra_args: str, max_total_tokens: int = 400, max_running_requests: int = 8) -> Scheduler:
    """The real Scheduler over FakeRunner; extra_args are launch_server flags."""
    args = ServerArgs.parse_args(["--model-path", "fake", "--device", "cpu", *extra_args])
    config = ModelConfig(model_path="fake", tokenizer_path=None, served_model_name="fake", architecture="fake",
                         dtype="float32", context_length=CONTEXT, vocab_size=VOCAB, eos_token_ids=(EOS,),
                         hf_config=None)  # type: ignore[arg-type]
    runner = FakeRunner(max_total_tokens, max_running_requests, args.cache.page_size)
    return track(Scheduler(args, config, runner))  # type: ignore[arg-type]
