"""Agreement: how the tensor-parallel ranks of one PD server decide together.

Each rank has its own transfer backend and control socket (rank i talks to the other side's
rank i), so each sees its own events: its KVDone, its transfer's end, its lookup's answer. The
Scheduler state must nevertheless change identically on every rank in the same step (SPMD,
DESIGN §2). So a PD transition is taken only on facts counted over the ranks (all of them saw
it, or at least one did) and deadlines on the leader's clock. One all-reduce over the gloo CPU
group per poll while PD requests exist; nothing at all with tp 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshserve.cluster.comm import RankGroup


@dataclass(frozen=True)
class Facts:
    counts: list[int]  # per flag: how many ranks raised it
    size: int
    leader: list[bool]  # per leader flag: the leader's value

    def every(self, i: int) -> bool:
        return self.counts[i] == self.size

    def some(self, i: int) -> bool:
        return self.counts[i] > 0


class Agreement:
    def __init__(self, tp: RankGroup) -> None:
        self.tp = tp

    def facts(self, flags: list[bool], leader_flags: list[bool]) -> Facts:
        """Combine this rank's `flags` with every other rank's (same length on all: they describe
        SPMD state) and take the leader's `leader_flags` (its clock's deadlines)."""
        if self.tp.size == 1:
            return Facts([int(f) for f in flags], 1, list(leader_flags))
        mine = [int(f) for f in flags] + [int(f) if self.tp.is_leader else 0 for f in leader_flags]
        total = torch.tensor(mine, dtype=torch.int64)
        if total.numel():
            # The scheduler's host collectives (comm.py) run on the gloo CPU group too.
            dist.all_reduce(total, group=self.tp.cpu_group)
        values = total.tolist()
        return Facts(values[: len(flags)], self.tp.size, [v > 0 for v in values[len(flags):]])
