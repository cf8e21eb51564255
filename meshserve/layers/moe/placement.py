"""ExpertPlacement: which logical expert each physical expert slot of one MoE layer holds.

With `--ep-num-redundant-experts R` a layer of E experts has P = E + R physical slots; the
moe_ep group of size n splits them in contiguous ranges of P / n (rank k holds slots
[k·P/n, (k+1)·P/n)), so every rank holds the same number of expert weights and the dispatchers
find a slot's owner as slot // (P/n). A slot holds a copy of one logical expert; every logical
expert has at least one slot, the hottest ones have several.

The router chooses logical experts; `physical()` turns each choice into a slot: token t's
choice of expert e goes to e's (t mod copies(e))-th copy (copies in slot order). Copies hold
identical weights, so the output does not depend on which copy runs (up to the order in which
partial sums are added). The tables are device tensors of fixed shape, updated in place by
`assign`, so the lookup never reads the host and stays valid inside captured CUDA graphs.

Placements:
* `initial_slots`: experts 0..E-1 in order, then the R redundant slots copy experts 0, 1, ...
  (mod E) — what every rank computes at start-up before any load is known.
* `balanced_slots`: EPLB's rebalance (eplb.py) from measured loads: the redundant copies go,
  one at a time, to the expert with the highest load per copy; the copies are then packed
  greedily, heaviest first, onto the rank with the least load that has a free slot (and
  preferably no copy of that expert yet); within a rank, an expert already in a slot stays
  there, so only what changed moves. Pure and deterministic: every rank computes the same map
  from the same (all-gathered) loads.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence

import torch
from torch import nn

from meshserve.cluster.comm import SINGLE, RankGroup


def initial_slots(num_experts: int, num_redundant: int) -> list[int]:
    """slot -> logical expert before any load is measured."""
    return list(range(num_experts)) + [i % num_experts for i in range(num_redundant)]


def balanced_slots(loads: Sequence[int], ep_size: int, current: Sequence[int]) -> list[int]:
    """A new slot -> logical expert map for `len(current)` slots over `ep_size` ranks that
    balances `loads` (tokens per logical expert) per rank; see the module docstring."""
    num_experts, num_slots = len(loads), len(current)
    if num_slots % ep_size or num_slots < num_experts:
        raise ValueError(f"{num_slots} slots for {num_experts} experts over {ep_size} ranks")
    per_rank = num_slots // ep_size
    copies = [1] * num_experts
    # Each extra copy to the highest load per copy; among equals the expert with fewer copies,
    # then the lowest id (a heap of (-load per copy, copies, expert)).
    heap = [(-loads[e], 1, e) for e in range(num_experts)]
    heapq.heapify(heap)
    for _ in range(num_slots - num_experts):
        _, _, hottest = heapq.heappop(heap)
        copies[hottest] += 1
        heapq.heappush(heap, (-loads[hottest] / copies[hottest], copies[hottest], hottest))
    items = sorted(((loads[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])),
                   key=lambda item: (-item[0], item[1]))
    ranks: list[list[int]] = [[] for _ in range(ep_size)]
    rank_load = [0.0] * ep_size
    for load, expert in items:
        best = fallback = None  # the lightest free rank without a copy of `expert`, and with one
        for r in range(ep_size):
            if len(ranks[r]) == per_rank:
                continue
            if expert not in ranks[r]:
                if best is None or rank_load[r] < rank_load[best]:
                    best = r
            elif fallback is None or rank_load[r] < rank_load[fallback]:
                fallback = r
        # A second copy on the same rank balances nothing: only when every free rank has one.
        rank = best if best is not None else fallback
        ranks[rank].append(expert)
        rank_load[rank] += load
    slots: list[int] = []
    for rank, experts in enumerate(ranks):
        wanted = Counter(experts)
        row: list[int | None] = [None] * per_rank
        for i, expert in enumerate(current[rank * per_rank:(rank + 1) * per_rank]):
            if wanted[expert]:  # already here: keep its slot, its weights need not move
                row[i] = expert
                wanted[expert] -= 1
        rest = sorted(wanted.elements())
        slots += [expert if expert is not None else rest.pop(0) for expert in row]
    return slots


class ExpertPlacement(nn.Module):
    """One MoE layer's slot map and the router-choice -> slot lookup (module docstring)."""

    def __init__(self, num_experts: int, num_redundant: int = 0, ep: RankGroup = SINGLE) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.num_slots = num_experts + num_redundant
        if self.num_slots % ep.size:
            raise ValueError(f"{num_experts} experts + {num_redundant} redundant (--ep-num-redundant-experts) = "
                             f"{self.num_slots} expert slots do not divide over --ep {ep.size}")
        self.ep_size = ep.size
        self.first_slot, self.num_local = ep.shard(self.num_slots)
        self.slots: list[int] = []  # host copy of the map: slot -> logical expert
        # replicas[e, j]: e's j-th copy for j < copies[e], then repeated (fixed shape: an expert
        # has at most 1 + num_redundant copies).
        self.register_buffer("replicas", torch.zeros(num_experts, num_redundant + 1, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("copies", torch.ones(num_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("slot_expert", torch.zeros(self.num_slots, dtype=torch.int64), persistent=False)
        self.assign(initial_slots(num_experts, num_redundant))

    @property
    def local_experts(self) -> list[int]:
        """The logical expert of each of this rank's slots."""
        return self.slots[self.first_slot:self.first_slot + self.num_local]

    def assign(self, slots: Sequence[int]) -> None:
        """Take a new map (the weights must move with it: eplb.py). In-place device updates."""
        if len(slots) != self.num_slots or sorted(set(slots)) != list(range(self.num_experts)):
            raise ValueError(f"an expert placement must fill {self.num_slots} slots with every one of "
                             f"{self.num_experts} experts")
        self.slots = list(slots)
        holders: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, expert in enumerate(slots):
            holders[expert].append(slot)
        width = self.replicas.shape[1]
        table = [[h[j % len(h)] for j in range(width)] for h in holders]
        self.replicas.copy_(torch.tensor(table, dtype=torch.int64))
        self.copies.copy_(torch.tensor([len(h) for h in holders], dtype=torch.int64))
        self.slot_expert.copy_(torch.tensor(self.slots, dtype=torch.int64))

    def physical(self, ids: torch.Tensor) -> torch.Tensor:
        """Logical expert ids [T, k] -> slots [T, k]: token t's expert e -> e's (t mod copies)-th copy."""
        if self.num_slots == self.num_experts and self.ep_size == 1:
            return ids  # no copies and no rebalancing across ranks can have permuted the slots
        token = torch.arange(ids.shape[0], device=ids.device)[:, None]
        return self.replicas[ids, token % self.copies[ids]]
