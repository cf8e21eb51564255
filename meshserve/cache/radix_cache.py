"""Prefix caches: which KV slots already hold a token sequence's keys and values.

`RadixCache` is a radix tree over token ids whose edges carry the KV slots of their tokens.
Ownership invariant: every slot is owned by exactly one of (a) the KV pool's free list, (b) the
tree, (c) one request (the tokens it computed that are not yet in the tree). A request that
uses a tree prefix holds a lock on the prefix's last node; locked nodes and their ancestors are
never evicted. Eviction frees unlocked leaves, least recently used first.

The tree shares whole KV pages only (`KVPool.page_size`, N): every edge holds a multiple of N
tokens starting at a page boundary, so matches, inserts and splits are page-aligned, eviction
frees whole pages, and a child is keyed by its first page of tokens (two edges may share a first
token but not a first page). A request's partial last page is never cached: it stays the
request's and is freed whole with it.

`NoPrefixCache` is the same interface with nothing shared (`--disable-radix-cache`).
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

import torch

from meshserve.cache.kv_pool import KVPool

_clock = itertools.count()  # monotonic tiebreak so LRU order is total even within one time tick


@dataclass(eq=False)
class RadixNode:
    key: list[int] = field(default_factory=list)
    slots: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    parent: RadixNode | None = None
    children: dict[int, RadixNode] = field(default_factory=dict)
    lock_ref: int = 0
    last_access: tuple[float, int] = field(default_factory=lambda: (time.monotonic(), next(_clock)))

    def touch(self) -> None:
        self.last_access = (time.monotonic(), next(_clock))


@dataclass(frozen=True)
class PrefixMatch:
    slots: torch.Tensor  # KV slots of the matched prefix (int64, CPU)
    node: RadixNode | None  # lock this while using the slots; None for NoPrefixCache

    @property
    def length(self) -> int:
        return self.slots.numel()


class RadixCache:
    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self.root = RadixNode()
        self.root.lock_ref = 1  # the root is never evicted
        self._evictable = 0  # tokens in unlocked nodes
        self._protected = 0  # tokens in locked nodes

    # -- queries -------------------------------------------------------------------------------

    @property
    def evictable_size(self) -> int:
        return self._evictable

    @property
    def total_size(self) -> int:
        return self._evictable + self._protected

    def match_prefix(self, tokens: list[int]) -> PrefixMatch:
        """Longest cached prefix of `tokens` whose length is a multiple of the page size. Splits
        an edge that matches only partly, so the returned node covers the match exactly."""
        node = self.root
        parts: list[torch.Tensor] = []
        i = 0
        end = self._aligned(len(tokens))
        while i < end:
            child = node.children.get(self._child_key(tokens, i))
            if child is None:
                break
            n = self._aligned(_common_length(child.key, tokens, i, end))
            if n < len(child.key):
                child = self._split(child, n)
            child.touch()
            parts.append(child.slots)
            node = child
            i += n
        slots = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        return PrefixMatch(slots, node)

    # -- updates -------------------------------------------------------------------------------

    def insert(self, tokens: list[int], slots: torch.Tensor) -> int:
        """Add `tokens` (whole pages) with their `slots`. Returns how many leading tokens were
        already cached (whole pages too): the cache takes ownership of `slots[that:]`; of
        `slots[:that]` the caller still owns the part it computed itself (past its own cached
        prefix) and must free it."""
        assert len(tokens) % self.page_size == 0, "the cache holds whole pages only"
        node = self.root
        i = 0
        while i < len(tokens):
            key = self._child_key(tokens, i)
            child = node.children.get(key)
            if child is None:
                new = RadixNode(key=list(tokens[i:]), slots=slots[i:].clone(), parent=node)
                node.children[key] = new
                self._evictable += len(new.key)
                return i
            n = self._aligned(_common_length(child.key, tokens, i, len(tokens)))
            if n < len(child.key):
                child = self._split(child, n)
            child.touch()
            node = child
            i += n
        return i

    def lock(self, node: RadixNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref == 0:
                self._evictable -= len(node.key)
                self._protected += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: RadixNode | None) -> None:
        while node is not None and node is not self.root:
            if node.lock_ref <= 0:
                raise RuntimeError("radix cache: unlock of an unlocked node")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self._evictable += len(node.key)
                self._protected -= len(node.key)
            node = node.parent

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots from unlocked leaves (LRU first) if possible; returns
        how many were freed."""
        heap = [(leaf.last_access, id(leaf), leaf) for leaf in self._leaves() if leaf.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, leaf = heapq.heappop(heap)
            self.pool.free(leaf.slots)
            freed += len(leaf.key)
            self._evictable -= len(leaf.key)
            parent = leaf.parent
            assert parent is not None
            del parent.children[self._child_key(leaf.key, 0)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def reset(self) -> None:
        """Drop the whole tree, returning its slots to the pool. Only when nothing is locked."""
        if self._protected:
            raise RuntimeError("radix cache: reset while requests hold cached prefixes")
        self.evict(self._evictable)
        self.root = RadixNode()
        self.root.lock_ref = 1

    def held_slots(self) -> torch.Tensor:
        """Every slot the tree owns (read-only accounting, for tests and debugging); its length
        equals total_size while the bookkeeping is right."""
        parts = [node.slots for node in self._nodes() if node is not self.root]
        return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)

    # -- internals -----------------------------------------------------------------------------

    def _nodes(self) -> list[RadixNode]:
        nodes, stack = [], [self.root]
        while stack:
            node = stack.pop()
            nodes.append(node)
            stack.extend(node.children.values())
        return nodes

    def _child_key(self, tokens: list[int], start: int) -> int | tuple[int, ...]:
        """What a child starting at tokens[start] is found by: its first token, or with pages its
        first page (siblings may share a first token but never a first page)."""
        return tokens[start] if self.page_size == 1 else tuple(tokens[start : start + self.page_size])

    def _aligned(self, n: int) -> int:
        return n - n % self.page_size

    def _split(self, child: RadixNode, n: int) -> RadixNode:
        """Cut `child`'s edge after n tokens (whole pages); returns the new upper node (which keeps
        child's locks)."""
        parent = child.parent
        assert parent is not None and 0 < n < len(child.key) and n % self.page_size == 0
        upper = RadixNode(key=child.key[:n], slots=child.slots[:n], parent=parent,
                          children={self._child_key(child.key, n): child}, lock_ref=child.lock_ref,
                          last_access=child.last_access)
        parent.children[self._child_key(child.key, 0)] = upper
        child.key = child.key[n:]
        child.slots = child.slots[n:]
        child.parent = upper
        return upper

    def _leaves(self) -> list[RadixNode]:
        leaves, stack = [], [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            elif node is not self.root:
                leaves.append(node)
        return leaves


class NoPrefixCache:
    """Nothing is shared: every request computes its whole prompt, and slots go straight back to
    the pool when the request ends."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool

    evictable_size = 0
    total_size = 0

    def match_prefix(self, tokens: list[int]) -> PrefixMatch:
        return PrefixMatch(torch.empty(0, dtype=torch.int64), None)

    def insert(self, tokens: list[int], slots: torch.Tensor) -> int:
        # Nothing was cached before (0), and the pages are adopted and dropped at once.
        self.pool.free(slots)
        return 0

    def lock(self, node: RadixNode | None) -> None:
        pass

    def unlock(self, node: RadixNode | None) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def held_slots(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64)

    def reset(self) -> None:
        pass


PrefixCache = RadixCache | NoPrefixCache


def _common_length(key: list[int], tokens: list[int], start: int, end: int) -> int:
    """How many leading tokens of `key` equal tokens[start:end]."""
    n = 0
    limit = min(len(key), end - start)
    while n < limit and key[n] == tokens[start + n]:
        n += 1
    return n
