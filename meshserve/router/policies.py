"""Load-balancing policies: pick one worker among the healthy candidates for a request.

Every policy gets the candidates (healthy, non-empty, in the pool's order) and the request's
routing text; randomness comes from an injected `random.Random`, so tests are deterministic.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Protocol

from meshserve.router.args import CacheAwareConfig
from meshserve.router.prefix_tree import PrefixTree
from meshserve.router.worker import Worker


class Policy(Protocol):
    def select(self, candidates: Sequence[Worker], text: str) -> Worker: ...

    def forget(self, url: str) -> None:
        """The worker left the pool."""


class RandomPolicy:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def select(self, candidates: Sequence[Worker], text: str) -> Worker:
        return self._rng.choice(candidates)

    def forget(self, url: str) -> None:
        pass


class RoundRobinPolicy:
    """Each call takes the next candidate; the counter is global, so the split over a stable
    set of healthy workers is even (within one request)."""

    def __init__(self) -> None:
        self._next = 0

    def select(self, candidates: Sequence[Worker], text: str) -> Worker:
        worker = candidates[self._next % len(candidates)]
        self._next += 1
        return worker

    def forget(self, url: str) -> None:
        pass


class PowerOfTwoPolicy:
    """Two distinct random candidates; the less loaded wins (the first drawn on a tie)."""

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def select(self, candidates: Sequence[Worker], text: str) -> Worker:
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(list(candidates), 2)
        return b if b.load < a.load else a

    def forget(self, url: str) -> None:
        pass


class CacheAwarePolicy:
    """Prefix affinity, as sglang-router's cache_aware:

    * imbalanced load (max − min > abs threshold and max > min × rel threshold): the least
      loaded worker, cache ignored;
    * otherwise the worker with the longest remembered prefix of the text if it covers more than
      `cache_threshold` of it; else the worker that remembers the least text (the most room).

    The chosen worker then remembers the text."""

    def __init__(self, config: CacheAwareConfig) -> None:
        self.config = config
        self.tree = PrefixTree(config.max_tree_size)

    def _imbalanced(self, candidates: Sequence[Worker]) -> bool:
        loads = [w.load for w in candidates]
        low, high = min(loads), max(loads)
        return high - low > self.config.balance_abs_threshold and high > low * self.config.balance_rel_threshold

    def select(self, candidates: Sequence[Worker], text: str) -> Worker:
        if self._imbalanced(candidates):
            worker = min(candidates, key=lambda w: w.load)
        else:
            by_url = {w.url: w for w in candidates}
            matched, url = self.tree.longest_match(text, by_url)
            if url is not None and text and matched / len(text) > self.config.cache_threshold:
                worker = by_url[url]
            else:
                worker = min(candidates, key=lambda w: self.tree.size(w.url))
        self.tree.insert(text, worker.url)
        return worker

    def forget(self, url: str) -> None:
        self.tree.remove_tenant(url)


def make_policy(name: str, cache_aware: CacheAwareConfig, rng: random.Random | None = None) -> Policy:
    rng = rng or random.Random()
    if name == "random":
        return RandomPolicy(rng)
    if name == "round_robin":
        return RoundRobinPolicy()
    if name == "power_of_two":
        return PowerOfTwoPolicy(rng)
    if name == "cache_aware":
        return CacheAwarePolicy(cache_aware)
    raise ValueError(f"unknown policy {name!r}")
