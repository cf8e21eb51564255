"""ExpertBalancer: the expert loads of a model's MoE layers, and EPLB (--enable-eplb) — moving
expert copies between expert-parallel ranks so that every rank computes about as many
(token, expert) pairs.

Loads. Each FusedExperts counts, on the device, the pairs its local slots computed. Every
LOAD_SYNC_FORWARDS forward steps, before a rebalance, and at the first step in which the group
runs no forward (it went idle) the counts are all-gathered over moe_ep into per-slot counts of
the whole group — no host read — and added to running totals:
per logical expert (summed over layers) and per moe_ep rank. `report()` reads them (the
leader, for /metrics, once per stats interval; on CUDA from an asynchronous host copy, so the
report never waits for the GPU).

Rebalance, every --eplb-rebalance-num-iterations forward steps: the per-slot counts since the
last rebalance become per-logical-expert loads of each layer; every rank computes the same new
map from them (placement.balanced_slots, deterministic on identical all-gathered integers);
then the weights move: each slot whose expert changes receives that expert's weights from a
rank that held it — its own rank if possible, else the lowest such rank — through one
all_to_all_single per slot tensor (stacked weights, FP8 experts' scales) and layer, and is
overwritten in place (the same storage, so captured CUDA graphs stay valid). A window without any counted pair changes
nothing.

When: `after_forward()` is called once per forward step by the model runner. Every rank of a
tensor-parallel group runs the same forwards (under DP attention also the idle ones: the
step contract), so the counter, and with it the collectives here, are the same on every rank of
moe_ep. Counting forwards, not scheduler steps, makes steps without any forward (every DP group
idle) count on no rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from meshserve.cluster.comm import RankGroup
from meshserve.layers.moe.experts import FusedExperts
from meshserve.layers.moe.layer import SparseMoeBlock
from meshserve.layers.moe.placement import balanced_slots

logger = logging.getLogger("meshserve")

LOAD_SYNC_FORWARDS = 16  # how stale the reported loads may be, in forward steps


@dataclass(frozen=True)
class ExpertLoad:
    """Running totals since start-up (what /metrics shows)."""

    expert_tokens: tuple[int, ...]  # (token, expert) pairs per logical expert, summed over MoE layers
    rank_tokens: tuple[int, ...]  # pairs computed per moe_ep rank, summed over MoE layers
    rebalances: int
    moved_experts: int  # expert slots whose weights were replaced, over all layers and ranks


class ExpertBalancer:
    def __init__(self, blocks: list[SparseMoeBlock], ep: RankGroup, rebalance_every: int | None) -> None:
        """`rebalance_every`: forward steps between rebalances; None records loads only."""
        self.blocks = blocks
        self.ep = ep
        self.rebalance_every = rebalance_every
        first = blocks[0].placement
        device = first.replicas.device
        self.window = torch.zeros(len(blocks), first.num_slots, dtype=torch.int64, device=device)
        # Running totals: pairs per logical expert, then per moe_ep rank.
        self.num_experts = first.num_experts
        self.totals = torch.zeros(first.num_experts + ep.size, dtype=torch.int64, device=device)
        # On CUDA each gather also copies the totals to pinned host memory (asynchronously), and
        # report() takes the latest copy that has landed: the stats never wait for the GPU.
        cuda = device.type == "cuda"
        self._host_totals = torch.zeros(self.totals.shape, dtype=torch.int64, pin_memory=cuda)
        self._copied = torch.cuda.Event() if cuda else None
        self._reported = [0] * self.totals.numel()
        self.forwards = 0
        self.ungathered = 0  # forwards counted locally since the last gather
        self.rebalances = 0
        self.moved_experts = 0

    @classmethod
    def of_model(cls, model: nn.Module, ep: RankGroup, rebalance_every: int | None) -> ExpertBalancer | None:
        blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
        return cls(blocks, ep, rebalance_every) if blocks else None

    def reset(self) -> None:
        """Forget what was counted so far (CUDA graph capture runs forwards on dummy tokens)."""
        for block in self.blocks:
            block.experts.take_load()
        for totals in (self.window, self.totals, self._host_totals):
            totals.zero_()
        self._reported = [0] * self.totals.numel()

    def after_forward(self) -> None:
        self.forwards += 1
        self.ungathered += 1
        due = self.rebalance_every is not None and self.forwards % self.rebalance_every == 0
        if due or self.forwards % LOAD_SYNC_FORWARDS == 0:
            self._gather()
        if due:
            self._rebalance()

    def flush(self) -> None:
        """At a step without any forward on any rank of the group (it went idle): gather what is
        still counted locally, so the totals are exact while nothing runs."""
        if self.ungathered:
            self._gather()

    def report(self) -> ExpertLoad:
        if self._copied is None:
            self._reported = self.totals.tolist()
        elif self._copied.query():  # the last gather's copy has landed
            self._reported = self._host_totals.tolist()
        values = self._reported
        return ExpertLoad(expert_tokens=tuple(values[:self.num_experts]), rank_tokens=tuple(values[self.num_experts:]),
                          rebalances=self.rebalances, moved_experts=self.moved_experts)

    def _gather(self) -> None:
        self.ungathered = 0
        local = torch.stack([block.experts.take_load() for block in self.blocks])  # [layers, local slots]
        slots = self.ep.all_gather(local, dim=1)  # [layers, all slots], rank k's at [k·s, (k+1)·s)
        self.window += slots
        self.totals[self.num_experts:] += slots.view(len(self.blocks), self.ep.size, -1).sum(dim=(0, 2))
        experts = torch.stack([block.placement.slot_expert for block in self.blocks])
        self.totals.index_add_(0, experts.flatten(), slots.flatten())  # logical expert e is totals[e]
        if self._copied is not None:
            self._host_totals.copy_(self.totals, non_blocking=True)
            self._copied.record()

    def _rebalance(self) -> None:
        window = self.window.tolist()
        self.window.zero_()
        if not any(map(any, window)):
            return
        moved = 0
        for block, counts in zip(self.blocks, window):
            placement = block.placement
            loads = [0] * placement.num_experts
            for slot, count in enumerate(counts):
                loads[placement.slots[slot]] += count
            new = balanced_slots(loads, self.ep.size, placement.slots)
            moved += move_experts(block.experts, placement.slots, new, self.ep)
            placement.assign(new)
            block.experts.local_experts = placement.local_experts
        self.rebalances += 1
        self.moved_experts += moved
        if self.ep.rank == 0:
            logger.info("EPLB: rebalance %d after %d forward steps: %d expert slots over %d MoE layers took "
                        "new experts", self.rebalances, self.forwards, moved, len(self.blocks))


def move_experts(experts: FusedExperts, old: list[int], new: list[int], ep: RankGroup) -> int:
    """Overwrite this rank's slots whose expert changes from `old` to `new` (slot -> expert maps
    of the whole group) with the weights of a slot that holds that expert under `old`. Returns
    the number of changed slots in the group (the same on every rank)."""
    per_rank = len(old) // ep.size
    holders: dict[int, list[int]] = {}
    for slot, expert in enumerate(old):
        holders.setdefault(expert, []).append(slot)
    plan = []  # (new slot, old slot it copies), by new slot
    for slot, expert in enumerate(new):
        if old[slot] != expert:
            here = [q for q in holders[expert] if q // per_rank == slot // per_rank]
            plan.append((slot, (here or holders[expert])[0]))
    if not plan:
        return 0
    me, first = ep.rank, ep.rank * per_rank
    # Sent to each rank in its order of new slots; received from each rank likewise.
    sends = [[q - first for p, q in plan if q // per_rank == me and p // per_rank == dst] for dst in range(ep.size)]
    recvs = [[p - first for p, q in plan if p // per_rank == me and q // per_rank == src] for src in range(ep.size)]
    send_rows = torch.tensor([q for rows in sends for q in rows], dtype=torch.int64, device=experts.w13.device)
    recv_rows = torch.tensor([p for rows in recvs for p in rows], dtype=torch.int64, device=experts.w13.device)
    for data in experts.slot_tensors():  # weights, and FP8 experts' scales
        outgoing = data.index_select(0, send_rows)  # a copy: read before any slot is overwritten
        if ep.size == 1:
            incoming = outgoing
        else:
            incoming = outgoing.new_empty((len(recv_rows), *data.shape[1:]))
            dist.all_to_all_single(incoming, outgoing, [len(r) for r in recvs], [len(s) for s in sends],
                                   group=ep.group)
        data.index_copy_(0, recv_rows, incoming)
    return len(plan)
