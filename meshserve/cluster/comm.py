"""The tensor-parallel group as the layers see it: a rank, a size and two collectives.

Layers receive a TensorParallelGroup and never compute ranks themselves; with size 1 every
collective is the identity, so single-GPU and CPU runs pay nothing for the parallel structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorParallelGroup:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None  # None only when size == 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"tp rank {self.rank} out of range for size {self.size}")
        if self.size > 1 and self.group is None:
            raise ValueError("a tensor-parallel group of size > 1 needs a process group")

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

    def shard(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's even share of `total`; `total` must divide evenly."""
        if total % self.size:
            raise ValueError(f"{total} does not divide evenly over tensor-parallel size {self.size}")
        length = total // self.size
        return self.rank * length, length


SINGLE = TensorParallelGroup()
