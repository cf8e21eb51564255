"""Tensor-parallel linear layers. Each owns a `weight_loader` that cuts its shard out of a full
checkpoint tensor, so model code names parallel layers but never does rank arithmetic.

Shapes follow torch: weight is [out_features_local, in_features_local].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.cluster.comm import SINGLE, TensorParallelGroup


class _ParallelLinear(nn.Module):
    def __init__(self, in_local: int, out_local: int, bias: bool, dtype: torch.dtype, tp: TensorParallelGroup) -> None:
        super().__init__()
        self.tp = tp
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local, dtype=dtype), requires_grad=False) if bias else None
        self.weight.weight_loader = self.weight_loader
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        raise NotImplementedError


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{what}: checkpoint shard has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


class ColumnParallelLinear(_ParallelLinear):
    """Output features split over ranks; the output stays sharded (no communication)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: TensorParallelGroup = SINGLE) -> None:
        _, out_local = tp.shard(out_features)
        super().__init__(in_features, out_local, bias, dtype, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        start, length = self.tp.shard(loaded.shape[0])
        _copy(param.data, loaded.narrow(0, start, length), "column-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix (gate and up).
    Each rank holds its shard of every part, parts concatenated in order."""

    def __init__(self, in_features: int, output_sizes: list[int], *, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: TensorParallelGroup = SINGLE) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias, dtype=dtype, tp=tp)
        self.local_sizes = [tp.shard(size)[1] for size in output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:  # type: ignore[override]
        offset = sum(self.local_sizes[:shard_id])
        length = self.local_sizes[shard_id]
        start = self.tp.rank * length
        _copy(param.data.narrow(0, offset, length), loaded.narrow(0, start, length), f"merged part {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matrix, split by heads.

    When there are fewer KV heads than ranks, each KV head is replicated on tp/num_kv_heads
    consecutive ranks (rank r holds KV head r * num_kv_heads // tp)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, *,
                 bias: bool = False, dtype: torch.dtype = torch.float32, tp: TensorParallelGroup = SINGLE) -> None:
        if num_heads % tp.size:
            raise ValueError(f"{num_heads} attention heads do not divide over tensor-parallel size {tp.size}")
        if num_kv_heads >= tp.size and num_kv_heads % tp.size:
            raise ValueError(f"{num_kv_heads} KV heads do not divide over tensor-parallel size {tp.size}")
        if num_kv_heads < tp.size and tp.size % num_kv_heads:
            raise ValueError(f"tensor-parallel size {tp.size} is not a multiple of {num_kv_heads} KV heads")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.total_kv_heads = num_kv_heads
        q_size = self.num_heads * head_dim
        kv_size = self.num_kv_heads * head_dim
        _ParallelLinear.__init__(self, hidden_size, q_size + 2 * kv_size, bias, dtype, tp)
        self.q_size, self.kv_size = q_size, kv_size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:  # type: ignore[override]
        if shard_id == "q":
            offset, length, start = 0, self.q_size, self.tp.rank * self.q_size
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            length = self.kv_size
            kv_head = self.tp.rank * self.total_kv_heads // self.tp.size if self.total_kv_heads < self.tp.size \
                else self.tp.rank * self.num_kv_heads
            start = kv_head * self.head_dim
        _copy(param.data.narrow(0, offset, length), loaded.narrow(0, start, length), f"qkv part {shard_id}")


class RowParallelLinear(_ParallelLinear):
    """Input features split over ranks; partial outputs are summed with one all-reduce.
    The bias is added once, after the reduction."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: TensorParallelGroup = SINGLE) -> None:
        _, in_local = tp.shard(in_features)
        super().__init__(in_local, out_features, bias, dtype, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param is self.bias:
            _copy(param.data, loaded, "row-parallel bias")
            return
        start, length = self.tp.shard(loaded.shape[1])
        _copy(param.data, loaded.narrow(1, start, length), "row-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(F.linear(x, self.weight))
        return out if self.bias is None else out + self.bias
