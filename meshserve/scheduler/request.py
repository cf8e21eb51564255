"""Req: one sequence's state inside the scheduler.

KV layout of a request (its row in the ReqToTokenPool), by token position:
  [0, prefix_len)      slots owned by the prefix cache, kept alive by a lock on `prefix_node`
  [prefix_len, kv_len) slots this request computed and owns; with KV pages (--page-size N)
                       prefix_len is a multiple of N and the request owns these slots' whole
                       pages, so its partial last page's unwritten tail too
  kv_len == len(fill_ids) - 1 after each step that sampled a token: the newest token has no KV yet
  (kv_len == len(fill_ids) while a decode step is in flight under --enable-overlap-schedule: the
  step has written the newest token's KV, and its own token is not in output_ids yet).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from meshserve.cache.radix_cache import RadixNode
from meshserve.messages import Bootstrap, FinishReason, GenerateReq, TopLogprob
from meshserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from xgrammar import GrammarMatcher


class ReqState(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    DONE = "done"
    # Prefill-decode disaggregation (meshserve/disagg/; each has the transfer-timeout deadline).
    BOOTSTRAPPING = "bootstrapping"  # decode: looking the prefill up, waiting for KV slots
    AWAITING_KV = "awaiting_kv"  # decode: KVRequest sent; prefill: prefilled, waiting for it
    TRANSFERRING = "transferring"  # prefill: writing the prompt's KV into the decode's slots
    AWAITING_ACK = "awaiting_ack"  # prefill: KVDone sent; its KV is freed on the decode's KVAck


@dataclass(eq=False)
class Req:
    rid: str
    input_ids: list[int]
    sampling: SamplingParams
    output_limit: int  # the most tokens this request may generate (the one length limit)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    bootstrap: Bootstrap | None = None
    state: ReqState = ReqState.WAITING
    deadline: float = float("inf")  # time.monotonic() by which a PD state must have ended

    output_ids: list[int] = field(default_factory=list)
    row: int | None = None  # ReqToTokenPool row while the request holds KV
    prefix_len: int = 0
    kv_len: int = 0
    prefix_node: RadixNode | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache at first admission
    finish: FinishReason | None = None
    # Structured output: the grammar's state after every token in output_ids (None for free text,
    # and while the grammar compiles); advanced by the host as each token is read.
    grammar: GrammarMatcher | None = None

    # what has not been sent to the TokenizerManager yet
    unsent_from: int = 0  # index into output_ids
    unsent_logprobs: list[float] = field(default_factory=list)
    unsent_top_logprobs: list[list[TopLogprob]] = field(default_factory=list)

    @classmethod
    def from_message(cls, msg: GenerateReq, context_length: int) -> Req:
        limit = max(0, min(msg.sampling.max_new_tokens, context_length - len(msg.input_ids)))
        return cls(rid=msg.rid, input_ids=list(msg.input_ids), sampling=msg.sampling, output_limit=limit,
                   return_logprob=msg.return_logprob, top_logprobs_num=msg.top_logprobs_num,
                   bootstrap=msg.bootstrap)

    @property
    def tokens_left(self) -> int:
        """Tokens this request may still generate."""
        return self.output_limit - len(self.output_ids)

    @property
    def context_limited(self) -> bool:
        """True when the context length, not max_new_tokens, sets output_limit."""
        return self.output_limit < self.sampling.max_new_tokens

    @property
    def fill_ids(self) -> list[int]:
        """Every token of the sequence so far; the model must have seen all but the last."""
        return self.input_ids + self.output_ids

    @property
    def seq_len(self) -> int:
        """len(fill_ids), without building the list (the per-step paths need only this)."""
        return len(self.input_ids) + len(self.output_ids)

    def tokens(self, start: int, end: int) -> list[int]:
        """fill_ids[start:end], without building fill_ids."""
        n = len(self.input_ids)
        if end <= n:
            return self.input_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.input_ids[start:] + self.output_ids[: end - n]

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.input_ids[-1]

    @property
    def wants_logprobs(self) -> bool:
        return self.return_logprob or self.top_logprobs_num > 0

    @property
    def finished(self) -> bool:
        return self.finish is not None
