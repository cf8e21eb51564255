"""KVLedger: who owns which KV slot, for the scheduler.

Allocating KV is kept apart from planning compute (scheduler.py decides what runs; this file
decides where its keys and values live), because a request may hold KV it does not compute:
a disaggregated decode server pre-allocates a prompt's KV and receives it from a prefill server.

Ownership invariant (see cache/radix_cache.py and Req's docstring): every slot is owned by exactly
one of the pool's free list, the prefix cache, or one request. A request that holds KV has a row
in the request-to-token table; `[0, prefix_len)` of it is cache-owned (locked through
`prefix_node`), `[prefix_len, kv_len)` request-owned.
"""

from __future__ import annotations

import torch

from meshserve.cache.kv_pool import KVPool, ReqToTokenPool
from meshserve.cache.radix_cache import NoPrefixCache, PrefixMatch, RadixCache
from meshserve.scheduler.request import Req


class KVLedger:
    def __init__(self, pool: KVPool, rows: ReqToTokenPool, cache: RadixCache | NoPrefixCache) -> None:
        self.pool = pool
        self.rows = rows
        self.cache = cache

    @property
    def used_tokens(self) -> int:
        """Slots held by requests or locked prefixes (not evictable, not free)."""
        return self.pool.size - self.pool.num_free - self.cache.evictable_size

    def room_for_extend(self, req: Req, n: int, reserve: int = 0) -> bool:
        """Make room (evicting cached prefixes) for `req`'s next n tokens plus `reserve` more
        (head-room for what running sequences will generate); False if even that is not enough.
        A request without a row starts from a cached prefix: `extend` comes after `attach`."""
        return self._ensure_free(n + reserve)

    def room_for_decode(self, reqs: list[Req]) -> bool:
        """Make room for one more token of each of `reqs`; False if even evicting is not enough."""
        return self._ensure_free(len(reqs))

    def _ensure_free(self, n: int) -> bool:
        if self.pool.num_free < n:
            self.cache.evict(n - self.pool.num_free)
        return self.pool.num_free >= n

    # -- a request's row --------------------------------------------------------------------

    def match(self, req: Req) -> PrefixMatch:
        """The cached prefix `req` could start from, locked until `attach`ed or `unmatch`ed. The
        newest token is never matched: the step that computes it must produce its logits."""
        match = self.cache.match_prefix(req.fill_ids[:-1])
        self.cache.lock(match.node)
        return match

    def unmatch(self, match: PrefixMatch) -> None:
        self.cache.unlock(match.node)

    def attach(self, req: Req, match: PrefixMatch) -> bool:
        """Give `req` a row starting from the (locked) `match`; False, unlocking it, when no row is
        free."""
        row = self.rows.alloc()
        if row is None:
            self.unmatch(match)
            return False
        req.row = row
        req.prefix_node, req.prefix_len, req.kv_len = match.node, match.length, match.length
        self.rows.assign(row, 0, match.slots)
        return True

    # -- slots for new tokens ---------------------------------------------------------------

    def extend(self, req: Req, n: int) -> torch.Tensor:
        """Slots for `req`'s next n tokens (positions kv_len ...), recorded in its host row (the
        runner writes the device table from the step's inputs). The caller made room first."""
        slots = self.pool.alloc(n)
        assert slots is not None, "room_for_* must come first"
        self.rows.record(req.row, req.kv_len, slots)
        return slots

    def extend_each(self, reqs: list[Req]) -> torch.Tensor:
        """One slot per request for its next token (decode); the caller made room first."""
        slots = self.pool.alloc(len(reqs))
        assert slots is not None, "room_for_* must come first"
        self.rows.record_each([req.row for req in reqs], [req.kv_len for req in reqs], slots)
        return slots

    def slots(self, req: Req, end: int, start: int = 0) -> torch.Tensor:
        return self.rows.slots(req.row, end, start)

    # -- giving KV back ---------------------------------------------------------------------

    def release(self, req: Req) -> None:
        """Hand the request's computed KV to the prefix cache (which frees what it already had)
        and drop its row. A finished request's tokens stay reusable by later requests; a
        retracted one is re-admitted through the same cache."""
        assert req.row is not None
        self._give_to_cache(req)
        self.cache.unlock(req.prefix_node)
        self.rows.free(req.row)
        req.row, req.prefix_node, req.prefix_len, req.kv_len = None, None, 0, 0

    def cache_computed_prefix(self, req: Req) -> None:
        """After a chunk: move the computed tokens into the prefix cache and re-point the row at
        the cache's slots, so the request owns nothing and its prefix is locked. Without a
        sharing cache the request simply keeps owning its slots."""
        if not isinstance(self.cache, RadixCache):
            return
        tokens = self._give_to_cache(req)
        match = self.cache.match_prefix(tokens)
        assert match.length == req.kv_len
        self.rows.assign(req.row, 0, match.slots)
        self.cache.lock(match.node)
        self.cache.unlock(req.prefix_node)
        req.prefix_node, req.prefix_len = match.node, req.kv_len

    def _give_to_cache(self, req: Req) -> list[int]:
        """Insert [0, kv_len) into the cache and free the slots it already held for those tokens."""
        tokens = req.fill_ids[: req.kv_len]
        slots = self.rows.slots(req.row, req.kv_len)
        already = self.cache.insert(tokens, slots)
        if already > req.prefix_len:
            self.pool.free(slots[req.prefix_len : already])
        return tokens

    def reset(self) -> None:
        self.cache.reset()
