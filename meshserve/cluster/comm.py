"""A rank group: some global ranks of the world (one of the named groups of
meshserve.cluster.groups), this process's position in it, the collectives the layers use (on the
device group: NCCL on GPU, gloo on CPU) and the ones the schedulers use (on a gloo CPU group:
bytes and small integers, never pickled objects).

Layers receive a RankGroup and never compute ranks themselves; with size 1 every collective is
the identity, so single-GPU and CPU runs pay nothing for the parallel structure. Broadcasts come
from the group's first member (`first_rank`, a global rank), which is the group's leader.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankGroup:
    rank: int = 0  # this process's position in `ranks`
    ranks: tuple[int, ...] = (0,)  # the members' global ranks, in group order
    group: dist.ProcessGroup | None = None  # device collectives; None only when size == 1
    cpu_group: dist.ProcessGroup | None = None  # host collectives (gloo); None only when size == 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"group rank {self.rank} out of range for size {self.size}")
        if self.size > 1 and (self.group is None or self.cpu_group is None):
            raise ValueError("a rank group of size > 1 needs device and CPU process groups")

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def first_rank(self) -> int:
        """Global rank of the group's leader (torch.distributed's `src` is a global rank)."""
        return self.ranks[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's `x` along `dim`, in rank order."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=dim)

    def broadcast_from_leader(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank gets the leader's `x` (same shape and dtype on all ranks) — e.g. sampled token ids,
        so all ranks advance identically whatever their random state."""
        if self.size > 1:
            dist.broadcast(x, src=self.first_rank, group=self.group)
        return x

    def broadcast_bytes(self, data: bytes | None) -> bytes:
        """The leader's `data` on every rank, over the CPU group (length first, then the bytes).
        Other ranks pass None."""
        if self.size == 1:
            assert data is not None
            return data
        length = torch.tensor([len(data) if self.is_leader else 0], dtype=torch.int64)
        dist.broadcast(length, src=self.first_rank, group=self.cpu_group)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.is_leader \
            else torch.empty(int(length), dtype=torch.uint8)
        if int(length):
            dist.broadcast(buf, src=self.first_rank, group=self.cpu_group)
        return buf.numpy().tobytes()

    def min_over_ranks(self, value: int) -> int:
        """The minimum of an integer across ranks (e.g. KV capacity: every rank must hold the pool)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t)

    def gather_ints(self, value: int) -> list[int]:
        """Every rank's integer, in group order, on every rank (over the CPU group)."""
        if self.size == 1:
            return [value]
        values = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(values, torch.tensor([value], dtype=torch.int64), group=self.cpu_group)
        return [int(v) for v in values]

    def check_same(self, value: int, what: str) -> None:
        """Raise on every rank unless all ranks hold the same `value` (a digest of `what`)."""
        if self.size == 1:
            return
        seen = self.gather_ints(value)
        if len(set(seen)) > 1:
            differ = [r for r, v in enumerate(seen) if v != seen[0]]
            raise RuntimeError(f"ranks diverged: {what} on rank(s) {[self.ranks[r] for r in differ]} differs "
                               f"from rank {self.first_rank}'s")

    def shard(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's even share of `total`; `total` must divide evenly."""
        if total % self.size:
            raise ValueError(f"{total} does not divide evenly over a group of {self.size} ranks")
        length = total // self.size
        return self.rank * length, length


SINGLE = RankGroup()
