"""RadixCache on its own (no model): match, insert, split, lock and evict keep the ownership
invariant — every slot of the pool is free or in the tree exactly once — and a match returns
exactly the slots stored for exactly the matched tokens; with KV pages, only whole pages."""

from __future__ import annotations

import random

import pytest
import torch

from meshserve.cache.kv_pool import KVPool
from meshserve.cache.radix_cache import RadixCache


def make(size: int = 64, page_size: int = 1) -> tuple[KVPool, RadixCache]:
    pool = KVPool(size=size, num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float32,
                  device=torch.device("cpu"), page_size=page_size)
    return pool, RadixCache(pool)


def check_invariant(pool: KVPool, cache: RadixCache) -> None:
    held = cache.held_slots()
    assert held.numel() == cache.total_size == cache.evictable_size + (cache.total_size - cache.evictable_size)
    everything = torch.cat([pool.free_slots(), held]).sort().values
    assert torch.equal(everything, torch.arange(pool.page_size, pool.page_size + pool.size))


def put(pool: KVPool, cache: RadixCache, tokens: list[int]) -> torch.Tensor:
    """Insert tokens as a finished request would: it computed all, the cache takes its whole
    pages, and it frees what was cached already and its partial last page."""
    slots = pool.alloc(len(tokens))
    assert slots is not None
    aligned = len(tokens) - len(tokens) % pool.page_size
    already = cache.insert(tokens[:aligned], slots[:aligned])
    pool.free(slots[:already])
    pool.free(slots[aligned:])
    return slots


def test_match_returns_exactly_the_stored_slots_of_the_matched_tokens():
    pool, cache = make()
    slots = put(pool, cache, [1, 2, 3, 4, 5])
    for query, length in (([1, 2, 3, 4, 5], 5), ([1, 2, 3], 3), ([1, 2, 3, 9], 3), ([1, 2, 3, 4, 5, 6], 5),
                          ([2, 3], 0), ([], 0), ([1], 1)):
        match = cache.match_prefix(query)
        assert match.length == length, query
        assert torch.equal(match.slots, slots[:length]), query
    check_invariant(pool, cache)


def test_insert_reports_what_was_cached_and_splits_edges():
    pool, cache = make()
    a = put(pool, cache, [1, 2, 3, 4])
    b_slots = pool.alloc(5)
    assert cache.insert([1, 2, 7, 8, 9], b_slots) == 2  # shares [1, 2]
    pool.free(b_slots[:2])
    assert torch.equal(cache.match_prefix([1, 2, 7, 8, 9]).slots, torch.cat([a[:2], b_slots[2:]]))
    assert torch.equal(cache.match_prefix([1, 2, 3, 4]).slots, a)
    duplicate = pool.alloc(4)
    assert cache.insert([1, 2, 3, 4], duplicate) == 4  # all cached: nothing adopted, the caller frees it
    pool.free(duplicate)
    assert cache.total_size == 7
    check_invariant(pool, cache)


def test_locked_prefixes_survive_eviction_and_lru_goes_first():
    pool, cache = make(size=20)
    s15, s68, s910 = put(pool, cache, [1, 2, 3, 4, 5]), put(pool, cache, [6, 7, 8]), put(pool, cache, [9, 10])
    cache.match_prefix([6, 7, 8])  # touch: used after [9, 10]
    locked = cache.match_prefix([1, 2, 3])  # splits [1..5]; lock the upper part
    cache.lock(locked.node)
    assert cache.evictable_size == 2 + 3 + 2  # [4, 5], [6, 7, 8], [9, 10]

    def held() -> set[int]:  # (match_prefix would touch what it finds)
        return set(cache.held_slots().tolist())

    # LRU: [4, 5] keeps the time of its insertion (the split touched only its upper part).
    assert cache.evict(2) == 2 and held() == set(s15[:3].tolist()) | set(s68.tolist()) | set(s910.tolist())
    assert cache.evict(2) == 2 and held() == set(s15[:3].tolist()) | set(s68.tolist())  # then [9, 10]
    check_invariant(pool, cache)
    assert cache.evict(100) == 3 and held() == set(s15[:3].tolist())  # the locked part stays
    assert torch.equal(cache.match_prefix([1, 2, 3, 4]).slots, locked.slots)
    check_invariant(pool, cache)
    cache.unlock(locked.node)
    assert cache.evictable_size == 3 and cache.evict(100) == 3
    assert pool.num_free == pool.size
    check_invariant(pool, cache)


def test_unlock_of_an_unlocked_node_is_refused():
    pool, cache = make()
    put(pool, cache, [1, 2])
    node = cache.match_prefix([1, 2]).node
    try:
        cache.unlock(node)
    except RuntimeError:
        return
    raise AssertionError("unlock below zero went unnoticed")


def test_reset_returns_everything_and_refuses_while_locked():
    pool, cache = make()
    put(pool, cache, [1, 2, 3])
    match = cache.match_prefix([1, 2])
    cache.lock(match.node)
    try:
        cache.reset()
        raise AssertionError("reset while a request holds a prefix")
    except RuntimeError:
        pass
    cache.unlock(match.node)
    cache.reset()
    assert pool.num_free == pool.size and cache.total_size == 0 and cache.match_prefix([1, 2, 3]).length == 0


def test_pages_are_matched_inserted_and_split_whole():
    pool, cache = make(size=64, page_size=4)
    a = put(pool, cache, list(range(1, 11)))  # 10 tokens: 2 pages cached, the partial third freed
    assert cache.total_size == 8 and pool.num_free == pool.size - 8
    for query, length in ((list(range(1, 11)), 8), (list(range(1, 8)), 4), ([1, 2, 3], 0), ([1, 2, 3, 4], 4),
                          ([1, 2, 3, 4, 5, 6, 9, 9], 4)):
        match = cache.match_prefix(query)
        assert match.length == length, query
        assert torch.equal(match.slots, a[:length]), query
    # A sibling that shares a first token (5) but not a first page: the edge splits at the page boundary.
    b = pool.alloc(8)
    assert cache.insert([1, 2, 3, 4, 5, 6, 9, 9], b) == 4
    pool.free(b[:4])
    assert torch.equal(cache.match_prefix([1, 2, 3, 4, 5, 6, 9, 9, 1]).slots, torch.cat([a[:4], b[4:]]))
    assert torch.equal(cache.match_prefix([1, 2, 3, 4, 5, 6, 7, 8]).slots, a[:8])
    assert cache.total_size == 12
    check_invariant(pool, cache)
    # Eviction frees whole pages: asked for 1 token, it frees the least recently used leaf page.
    assert cache.evict(1) == 4 and cache.match_prefix([1, 2, 3, 4, 5, 6, 9, 9]).length == 4
    assert pool.num_free == pool.size - 8
    check_invariant(pool, cache)


@pytest.mark.parametrize("page_size", [1, 3])
def test_random_operations_keep_the_invariant_and_a_model_of_the_cache(page_size):
    """Against a plain dict model: a match is the longest inserted-and-not-evicted prefix of
    whole pages."""
    rng = random.Random(11)
    pool, cache = make(size=200, page_size=page_size)
    stored: dict[tuple[int, ...], tuple[int, ...]] = {}  # prefix of whole pages -> slots of its last page
    locks = []
    for _ in range(300):
        op = rng.random()
        if op < 0.5:
            tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 12))]
            if pool.num_free < len(tokens):
                cache.evict(len(tokens))
            if pool.num_free < len(tokens):
                continue
            slots = put(pool, cache, tokens)
            for end in range(page_size, len(tokens) + 1, page_size):
                stored.setdefault(tuple(tokens[:end]), tuple(slots[end - page_size : end].tolist()))
        elif op < 0.7:
            query = [rng.randrange(4) for _ in range(rng.randrange(0, 12))]
            match = cache.match_prefix(query)
            assert match.length <= len(query) and match.length % page_size == 0
            for end in range(page_size, match.length + 1, page_size):
                assert stored.get(tuple(query[:end])) == tuple(match.slots[end - page_size : end].tolist())
            if match.length + page_size <= len(query):
                assert tuple(query[: match.length + page_size]) not in stored
            if rng.random() < 0.3 and match.node is not None:
                cache.lock(match.node)
                locks.append((query[: match.length], match))
        elif op < 0.85 and locks:
            cache.unlock(locks.pop(rng.randrange(len(locks)))[1].node)
        else:
            cache.evict(rng.randrange(1, 20))
            alive = set(cache.held_slots().tolist())
            stored = {k: v for k, v in stored.items() if v[0] in alive}
        check_invariant(pool, cache)
        for tokens, held in locks:  # a locked match is never evicted
            assert torch.equal(cache.match_prefix(tokens).slots, held.slots)
