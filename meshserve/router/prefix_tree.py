"""PrefixTree: which worker has seen which request text, for cache-aware routing.

An approximation of each worker's prefix cache kept by the router: a radix tree over characters
where every node records the workers ("tenants") whose requests passed through it and when.

Invariants:
* A tenant present on a node is present on all of the node's ancestors, so the deepest node
  holding a tenant ends that tenant's longest match.
* `size(tenant)` is the number of characters (edge lengths) of the nodes holding the tenant;
  when an `insert` takes it over `max_size`, the tenant's least recently used leaves are
  evicted until it is within EVICT_TO of it.
* Time is a counter, not the clock: the same calls give the same tree (deterministic tests).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Collection
from dataclasses import dataclass, field

# An eviction goes this far below the limit, so that its walk over the tenant's nodes is paid
# once per tenth of the limit inserted, not on every insert.
EVICT_TO = 0.9


@dataclass
class _Node:
    edge: str
    parent: _Node | None
    children: dict[str, _Node] = field(default_factory=dict)
    # tenant -> last access (the tree's counter)
    tenants: dict[str, int] = field(default_factory=dict)


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PrefixTree:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._root = _Node("", None)
        self._sizes: dict[str, int] = {}
        self._clock = itertools.count(1)

    def size(self, tenant: str) -> int:
        return self._sizes.get(tenant, 0)

    def insert(self, text: str, tenant: str) -> None:
        now = next(self._clock)
        node = self._root
        node.tenants[tenant] = now
        while text:
            child = node.children.get(text[0])
            if child is None:
                child = _Node(text, node)
                node.children[text[0]] = child
            else:
                common = _common_prefix_len(child.edge, text)
                if common < len(child.edge):
                    child = self._split(child, common)
            if tenant not in child.tenants:
                self._sizes[tenant] = self.size(tenant) + len(child.edge)
            child.tenants[tenant] = now
            text = text[len(child.edge):]
            node = child
        if self.size(tenant) > self.max_size:
            self._evict(tenant)

    def _split(self, node: _Node, at: int) -> _Node:
        """Cut `node`'s edge at `at`: a new parent takes the first part and the tenants."""
        assert node.parent is not None
        head = _Node(node.edge[:at], node.parent, tenants=dict(node.tenants))
        node.parent.children[head.edge[0]] = head
        node.edge = node.edge[at:]
        node.parent = head
        head.children[node.edge[0]] = node
        return head

    def longest_match(self, text: str, tenants: Collection[str]) -> tuple[int, str | None]:
        """(characters matched, tenant) for the longest prefix of `text` that one of `tenants`
        has; the most recently used such tenant on a tie; (0, None) if none has any."""
        best: tuple[int, str | None] = (0, None)
        node, matched = self._root, 0
        while text:
            child = node.children.get(text[0])
            if child is None:
                break
            common = _common_prefix_len(child.edge, text)
            present = [t for t in child.tenants if t in tenants]
            if not present:
                break
            best = (matched + common, max(present, key=lambda t: child.tenants[t]))
            if common < len(child.edge):
                break
            matched += common
            text = text[common:]
            node = child
        return best

    def remove_tenant(self, tenant: str) -> None:
        stack = [self._root]
        while stack:
            node = stack.pop()
            if node.tenants.pop(tenant, None) is not None:
                stack.extend(node.children.values())
        self._sizes.pop(tenant, None)
        self._prune(self._root)

    def _evict(self, tenant: str) -> None:
        """Drop the tenant from its least recently used leaves down to EVICT_TO × max_size: one
        walk over its nodes per eviction, and evictions are rare (each frees a tenth)."""
        target = int(self.max_size * EVICT_TO)
        heap = [(n.tenants[tenant], next(self._clock), n) for n in self._nodes_of(tenant) if self._is_leaf(n, tenant)]
        heapq.heapify(heap)
        while self.size(tenant) > target and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del node.tenants[tenant]
            self._sizes[tenant] -= len(node.edge)
            if not node.tenants and not node.children:
                del parent.children[node.edge[0]]
            if self._is_leaf(parent, tenant):
                heapq.heappush(heap, (parent.tenants[tenant], next(self._clock), parent))

    def _is_leaf(self, node: _Node, tenant: str) -> bool:
        """The tenant is on `node` (not the root) and on none of its children."""
        return (node is not self._root and tenant in node.tenants
                and not any(tenant in c.tenants for c in node.children.values()))

    def _nodes_of(self, tenant: str) -> list[_Node]:
        out, stack = [], [self._root]
        while stack:
            node = stack.pop()
            if tenant in node.tenants:
                out.append(node)
                stack.extend(node.children.values())
        return out

    def _prune(self, node: _Node) -> None:
        for key, child in list(node.children.items()):
            self._prune(child)
            if not child.tenants and not child.children:
                del node.children[key]
