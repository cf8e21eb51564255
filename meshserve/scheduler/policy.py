"""Admission policy for extend batches: the order waiting requests are tried in, and the
per-step token budget (max prefill tokens, chunked prefill).

Orders (--schedule-policy, SGLang's names): ``lpm`` longest cached prefix first, ``fcfs`` arrival,
``lof`` longest output first (most tokens left to generate). lof is for saturated offline work
with known output lengths (ignore_eos benchmarks, batch jobs): the long sequences start first and
the short ones fill in behind them, so the run does not end with a long tail of small decode
batches, each paying a whole step's weight reads for a few tokens. It trades arrival fairness for
that, which is why it is not the default."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from meshserve.cache.radix_cache import NoPrefixCache, RadixCache
from meshserve.config.server_args import SCHEDULE_POLICIES
from meshserve.scheduler.request import Req

# Longest-prefix-match ordering walks the radix tree once per waiting request; past this queue
# length the walk costs more than the cache hits it wins, so the order falls back to arrival.
LPM_MAX_QUEUE = 128


@dataclass
class PrefillBudget:
    """Tokens one extend step may still compute. Without chunking a prompt is taken whole or not
    at all — except that the first prompt of a step is always taken, however long, so a prompt
    above --max-prefill-tokens cannot starve."""

    left: int
    chunking: bool
    taken: int = 0

    @property
    def exhausted(self) -> bool:
        return self.left <= 0

    def take(self, remaining: int) -> int:
        if self.chunking:
            return min(remaining, self.left)
        return remaining if remaining <= self.left or self.taken == 0 else 0

    def spend(self, n: int) -> None:
        self.left -= n
        self.taken += n


class PrefillPolicy:
    def __init__(self, *, schedule_policy: str, max_prefill_tokens: int, chunked_prefill_size: int | None) -> None:
        if schedule_policy not in SCHEDULE_POLICIES:
            raise ValueError(f"unknown schedule policy {schedule_policy!r}")
        self.schedule_policy = schedule_policy
        self.max_prefill_tokens = max_prefill_tokens
        self.chunked_prefill_size = chunked_prefill_size

    def new_budget(self) -> PrefillBudget:
        if self.chunked_prefill_size is None:
            return PrefillBudget(left=self.max_prefill_tokens, chunking=False)
        return PrefillBudget(left=min(self.max_prefill_tokens, self.chunked_prefill_size), chunking=True)

    def order(self, waiting: Iterable[Req], cache: RadixCache | NoPrefixCache) -> list[Req]:
        reqs = list(waiting)
        if self.schedule_policy == "lof":
            rank = {id(r): r.tokens_left for r in reqs}
        elif self.schedule_policy == "fcfs" or isinstance(cache, NoPrefixCache) or len(reqs) > LPM_MAX_QUEUE:
            return reqs  # retracted requests are already first: the scheduler puts them back at the front
        else:
            rank = {id(r): cache.match_prefix(r.fill_ids[:-1]).length for r in reqs}
        # Retracted requests (with output) first, they were admitted before everything still
        # waiting; then the largest rank. The sort is stable: ties keep arrival order.
        return sorted(reqs, key=lambda r: (not r.output_ids, -rank[id(r)]))
