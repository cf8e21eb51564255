"""Tensor-parallel linear layers. Each owns a `weight_loader` that cuts its shard out of a full
checkpoint tensor, so model code names parallel layers but never does rank arithmetic.

Shapes follow torch: weight is [out_features_local, in_features_local].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from meshserve.cluster.comm import SINGLE, RankGroup
from meshserve.cluster.layout import KVHeadShare
from meshserve.config.quantization import Fp8Scheme
from meshserve.layers.dense import dense_linear
from meshserve.layers.fp8 import FP8, dequantize, fp8_linear, gemm_path, quantize_per_channel


@dataclass(frozen=True)
class _Cut:
    """Where a rank's part of one checkpoint tensor goes: along `dim` (0: output rows, 1: input
    columns), [src, src + length) of the checkpoint tensor fills [dst, dst + length) of the local
    weight. Every parameter of the layer (bias, scales) is cut consistently from it."""

    dim: int
    dst: int
    src: int
    length: int


def layer_fp8(quant: Fp8Scheme | None, module_names: list[str]) -> Fp8Scheme | None:
    """The FP8 scheme of the linear layer holding checkpoint modules `module_names`, or None
    when it stays in high precision."""
    return quant if quant is not None and quant.applies_to(module_names) else None


class ParallelLinear(nn.Module):
    """A weight [out_local, in_local] (+ bias) and, when FP8, its scales.

    FP8 parameters: `weight` float8_e4m3fn; `weight_scale` float32, one per output row
    ([out_local, 1], per-tensor checkpoint scales widened to their rows) or one per block;
    `input_scale` (a static activation scale) when the checkpoint has one. With online
    quantization (`--quantization fp8`) the weight loads in high precision and
    `finish_loading` quantizes it per row.

    `dequantize_at_load`: a layer whose weight the model reads directly instead of calling the
    layer (MLA's kv_b_proj, used in absorbed form) loads FP8 and its scales like any other
    (the scales sharded with the weight), and `finish_loading` replaces them with the
    dequantized weight in the model's dtype; under online quantization it is never quantized."""

    def __init__(self, in_local: int, out_local: int, bias: bool, dtype: torch.dtype, tp: RankGroup,
                 fp8: Fp8Scheme | None, dequantize_at_load: bool = False) -> None:
        super().__init__()
        self.tp = tp
        self.fp8 = fp8
        self.dtype = dtype
        self.dequantize_at_load = dequantize_at_load
        stored = FP8 if fp8 is not None and not fp8.online else dtype
        self.weight = nn.Parameter(torch.empty(out_local, in_local, dtype=stored), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_local, dtype=dtype), requires_grad=False) if bias else None
        self.weight_scale: nn.Parameter | None = None
        self.input_scale: nn.Parameter | None = None
        self.block = fp8.block if fp8 is not None else None
        if fp8 is not None and not fp8.online:
            rows, cols = (-(-out_local // self.block[0]), -(-in_local // self.block[1])) if self.block else (out_local, 1)
            self.weight_scale = nn.Parameter(torch.empty(rows, cols, dtype=torch.float32), requires_grad=False)
            if fp8.static_input_scale:  # fused parts keep the largest (zeros: nothing loaded yet)
                self.input_scale = nn.Parameter(torch.zeros((), dtype=torch.float32), requires_grad=False)
        self.gemm_path = gemm_path(self.weight.device, block=self.block, dtype=dtype, in_features=in_local,
                                   out_features=out_local) if fp8 is not None else None
        for param in self.parameters():
            param.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        raise NotImplementedError

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, cut: _Cut, what: str) -> None:
        if param is self.weight:
            _copy(param.data.narrow(cut.dim, cut.dst, cut.length), loaded.narrow(cut.dim, cut.src, cut.length), what)
        elif param is self.bias:  # along the output rows; whole when the cut is along the input
            rows = _Cut(0, 0, 0, loaded.shape[0]) if cut.dim == 1 else cut
            _copy(param.data.narrow(0, rows.dst, rows.length), loaded.narrow(0, rows.src, rows.length), f"{what} bias")
        elif param is self.input_scale:
            param.data.copy_(torch.maximum(param.data, loaded.reshape(())))
        elif self.block is not None:
            self._load_block_scale(param.data, loaded, cut, what)
        elif loaded.numel() == 1:  # a per-tensor scale: every row of this part gets it
            rows = param.data if cut.dim == 1 else param.data.narrow(0, cut.dst, cut.length)
            rows.fill_(loaded.reshape(()).item())
        else:  # per channel: the rows of the weight's rows
            loaded = loaded.reshape(-1, 1)
            if cut.dim == 1:
                _copy(param.data, loaded, f"{what} weight_scale")
            else:
                _copy(param.data.narrow(0, cut.dst, cut.length), loaded.narrow(0, cut.src, cut.length),
                      f"{what} weight_scale")

    def _load_block_scale(self, scale: torch.Tensor, loaded: torch.Tensor, cut: _Cut, what: str) -> None:
        """Block scales follow the weight's cut in whole blocks: a cut must start on a block
        boundary and cover whole blocks, except that a tensor's last, partial block may end it
        (on one rank, or on the last rank when both the checkpoint and the local weight end there)."""
        b = self.block[cut.dim]
        first, count = cut.dst // b, -(-cut.length // b)
        src_first = cut.src // b
        ends_both = src_first + count == loaded.shape[cut.dim] and cut.dst + cut.length == self.weight.shape[cut.dim]
        if cut.dst % b or cut.src % b or (cut.length % b and not ends_both):
            side = "output rows" if cut.dim == 0 else "input columns"
            raise ValueError(
                f"{what}: FP8 blocks of {self.block[0]}x{self.block[1]} do not divide this rank's {side} "
                f"[{cut.src}, {cut.src + cut.length}) under tensor parallelism {self.tp.size}; use a tp size whose "
                f"shards are multiples of {b}")
        _copy(scale.narrow(cut.dim, first, count), loaded.narrow(cut.dim, src_first, count), f"{what} block scales")

    def finish_loading(self) -> None:
        """After every checkpoint tensor is in: quantize an online-FP8 weight per output row, or
        dequantize a `dequantize_at_load` layer's FP8 weight."""
        if self.fp8 is None:
            return
        if self.dequantize_at_load:
            if not self.fp8.online:
                real = dequantize(self.weight.data, self.weight_scale.data, self.block).to(self.dtype)
                self.weight = nn.Parameter(real, requires_grad=False)
            self.fp8 = self.block = self.weight_scale = self.input_scale = self.gemm_path = None
            return
        if not self.fp8.online:
            return
        w8, scale = quantize_per_channel(self.weight.data)
        self.weight = nn.Parameter(w8, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)

    def _matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.fp8 is None:
            return dense_linear(x, self.weight, bias)
        return fp8_linear(x, self.weight, self.weight_scale, path=self.gemm_path, bias=bias, block=self.block,
                          input_scale=self.input_scale, activation_ub=self.fp8.activation_scale_ub)


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{what}: checkpoint shard has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


class ColumnParallelLinear(ParallelLinear):
    """Output features split over ranks; the output stays sharded (no communication)."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: RankGroup = SINGLE,
                 fp8: Fp8Scheme | None = None, dequantize_at_load: bool = False) -> None:
        self.out_start, out_local = tp.shard(out_features)
        super().__init__(in_features, out_local, bias, dtype, tp, fp8, dequantize_at_load)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        length = self.weight.shape[0]
        self._load(param, loaded, _Cut(0, 0, self.out_start, length), "column-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input stored as one matrix (gate and up).
    Each rank holds its shard of every part, parts concatenated in order."""

    def __init__(self, in_features: int, output_sizes: list[int], *, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: RankGroup = SINGLE,
                 fp8: Fp8Scheme | None = None) -> None:
        super().__init__(in_features, sum(output_sizes), bias=bias, dtype=dtype, tp=tp, fp8=fp8)
        self.local_sizes = [tp.shard(size)[1] for size in output_sizes]

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:  # type: ignore[override]
        length = self.local_sizes[shard_id]
        cut = _Cut(0, sum(self.local_sizes[:shard_id]), self.tp.rank * length, length)
        self._load(param, loaded, cut, f"merged part {shard_id}")


class QKVParallelLinear(ColumnParallelLinear):
    """Query, key and value projections in one matrix, split by heads over the attention-TP
    group; KV heads split or replicated by the one rule of meshserve.cluster.layout.KVHeadShare."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, *,
                 bias: bool = False, dtype: torch.dtype = torch.float32, tp: RankGroup = SINGLE,
                 fp8: Fp8Scheme | None = None) -> None:
        if num_heads % tp.size:
            raise ValueError(f"{num_heads} attention heads do not divide over tensor-parallel size {tp.size}")
        self.kv_share = KVHeadShare(num_kv_heads, tp.size)
        problem = self.kv_share.problem()
        if problem is not None:
            raise ValueError(problem)
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = self.kv_share.per_rank
        q_size = self.num_heads * head_dim
        kv_size = self.num_kv_heads * head_dim
        ParallelLinear.__init__(self, hidden_size, q_size + 2 * kv_size, bias, dtype, tp, fp8)
        self.q_size, self.kv_size = q_size, kv_size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:  # type: ignore[override]
        if shard_id == "q":
            offset, length, start = 0, self.q_size, self.tp.rank * self.q_size
        else:
            offset = self.q_size if shard_id == "k" else self.q_size + self.kv_size
            length = self.kv_size
            start = self.kv_share.first_head(self.tp.rank) * self.head_dim
        self._load(param, loaded, _Cut(0, offset, start, length), f"qkv part {shard_id}")


class RowParallelLinear(ParallelLinear):
    """Input features split over ranks; partial outputs are summed with one all-reduce.
    The bias is added once, after the reduction."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32, tp: RankGroup = SINGLE,
                 fp8: Fp8Scheme | None = None) -> None:
        self.in_start, in_local = tp.shard(in_features)
        super().__init__(in_local, out_features, bias, dtype, tp, fp8)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        self._load(param, loaded, _Cut(1, 0, self.in_start, self.weight.shape[1]), "row-parallel weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self._matmul(x, None))
        return out if self.bias is None else out + self.bias


class ReplicatedLinear(ParallelLinear):
    """A projection every rank holds whole and computes alike (MLA's down-projections): no
    communication; the checkpoint tensor (and its FP8 scales) loads as it is."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32, fp8: Fp8Scheme | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, SINGLE, fp8)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        self._load(param, loaded, _Cut(0, 0, 0, self.weight.shape[0]), "replicated weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._matmul(x, self.bias)
