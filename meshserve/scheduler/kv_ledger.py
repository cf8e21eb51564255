"""KVLedger: who owns which KV slot, for the scheduler.

Allocating KV is kept apart from planning compute (scheduler.py decides what runs; this file
decides where its keys and values live), because a request may hold KV it does not compute:
a disaggregated decode server pre-allocates a prompt's KV and receives it from a prefill server.

Ownership invariant (see cache/radix_cache.py and Req's docstring): every slot is owned by exactly
one of the pool's free list, the prefix cache, or one request. A request that holds KV has a row
in the request-to-token table; `[0, prefix_len)` of it is cache-owned (locked through
`prefix_node`), `[prefix_len, kv_len)` request-owned.

With KV pages of N tokens (`--page-size`), ownership is by whole pages: prefix_len is always a
multiple of N (the cache shares whole pages only), so the request owns the pages of
`[prefix_len, kv_len)`, including the not yet written tail of its last page, which its next
tokens fill before it takes a new page (position i lives at offset i % N of its page).
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
        """Slots held by requests (whole pages) or locked prefixes (not evictable, not free)."""
        return self.pool.size - self.pool.num_free - self.cache.evictable_size

    def room_for_extend(self, req: Req, n: int, reserve: int = 0) -> bool:
        """Make room (evicting cached prefixes) for `req`'s next n tokens plus `reserve` more
        (head-room for what running sequences will generate, counted in pages as if it continued
        `req`: exact for its own first decode token, an estimate for the rest); False if even
        that is not enough. A request without a row starts from a cached prefix, which is
        page-aligned like its kv_len of 0: `extend` comes after `attach`."""
        return self._ensure_free_pages(self.pool.pages_for(req.kv_len, n + reserve))

    def room_for_decode(self, reqs: list[Req]) -> bool:
        """Make room for one more token of each of `reqs` (a new page for each whose last page is
        full); False if even evicting is not enough."""
        return self._ensure_free_pages(sum(req.kv_len % self.pool.page_size == 0 for req in reqs))

    def _ensure_free_pages(self, n: int) -> bool:
        short = n - self.pool.num_free_pages
        if short > 0:
            self.cache.evict(short * self.pool.page_size)
        return self.pool.num_free_pages >= n

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
        """Slots for `req`'s next n tokens (positions kv_len ...): the rest of its last page, then
        new pages. Recorded in its host row (the runner writes the device table from the step's
        inputs). The caller made room first."""
        slots = self.pool.alloc(n, after=self._last_slot_in_partial_page(req))
        assert slots is not None, "room_for_* must come first"
        self.rows.record(req.row, req.kv_len, slots)
        return slots

    def extend_each(self, reqs: list[Req]) -> torch.Tensor:
        """One slot per request for its next token (decode): the next slot of its last page, or
        the first of a new page when that is full. The caller made room first."""
        page_size = self.pool.page_size
        opening = [i for i, req in enumerate(reqs) if req.kv_len % page_size == 0]
        pages = self.pool.alloc_pages(len(opening))
        assert pages is not None, "room_for_* must come first"
        if len(opening) == len(reqs):  # always with page size 1
            slots = pages * page_size
        else:
            slots = torch.tensor([self.rows.slot(req.row, req.kv_len - 1) + 1 for req in reqs], dtype=torch.int64)
            slots[opening] = pages * page_size
        self.rows.record_each([req.row for req in reqs], [req.kv_len for req in reqs], slots)
        return slots

    def _last_slot_in_partial_page(self, req: Req) -> int | None:
        """The slot of `req`'s newest token if its page has room after it, else None."""
        return self.rows.slot(req.row, req.kv_len - 1) if req.kv_len % self.pool.page_size else None

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
        """After a chunk: move the computed whole pages into the prefix cache and re-point the row
        at the cache's slots, so the request's prefix is locked and it owns only its partial last
        page, if any (the next chunk fills it). Without a sharing cache the request simply keeps
        owning its slots."""
        if not isinstance(self.cache, RadixCache):
            return
        tokens = self._give_to_cache(req, keep_partial_page=True)
        match = self.cache.match_prefix(tokens)
        assert match.length == len(tokens)
        self.rows.assign(req.row, 0, match.slots)
        self.cache.lock(match.node)
        self.cache.unlock(req.prefix_node)
        req.prefix_node, req.prefix_len = match.node, match.length

    def _give_to_cache(self, req: Req, *, keep_partial_page: bool = False) -> list[int]:
        """Insert the whole pages of [0, kv_len) into the cache and free the slots it already held
        for those tokens; returns the inserted tokens. The partial last page, which the cache
        never takes, is freed too unless `keep_partial_page`."""
        aligned = req.kv_len - req.kv_len % self.pool.page_size
        tokens = req.fill_ids[:aligned]
        slots = self.rows.slots(req.row, req.kv_len)
        already = self.cache.insert(tokens, slots[:aligned])
        if already > req.prefix_len:
            self.pool.free(slots[req.prefix_len : already])
        if not keep_partial_page:
            self.pool.free(slots[aligned:])
        return tokens

    def reset(self) -> None:
        self.cache.reset()
