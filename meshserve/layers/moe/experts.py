"""The routed experts of one MoE block: every expert's gated MLP (silu(x W1^T) * (x W3^T)) W2^T,
stacked into two tensors so that one kernel can run them all.

    w13: [local experts, 2 * I_local, hidden]   rows [0, I_local) gate (w1), then up (w3)
    w2:  [local experts, hidden, I_local]

Expert tensor parallelism (moe_tp) splits the intermediate size I over ranks as a dense MLP's
is (each rank's partial outputs are summed by the block's all-reduce). Expert parallelism
(moe_ep) gives each rank a contiguous range of the physical expert slots (placement.py); the
module holds this rank's slots, `local_experts[i]` being the logical expert in local slot i
(several slots may hold copies of one expert with --ep-num-redundant-experts). The checkpoint
holds one tensor per expert and projection; `weight_loader(param, loaded, shard_id, expert_id)`
copies it into every local slot of that expert and skips the others (shard_id: "w1" gate, "w3"
up, "w2" down), so model code never does rank arithmetic.

Load recording: `load[1 + i]` counts the (token, expert) pairs local slot i computed since the
last `take_load()`, accumulated on the device (no host read per step, capturable in CUDA
graphs; on the GPU a captured batch's padding rows count too). eplb.py gathers the counts.

Compute: on CUDA two grouped-GEMM Triton kernels over the (token, expert) pairs sorted by expert
(grouped_gemm.py; no host synchronisation, so decode steps run in CUDA graphs); elsewhere plain
PyTorch, one matmul pair per expert that received tokens (the reference).

FP8 experts (`fp8`: the model's Fp8Scheme). w13/w2 are float8_e4m3fn with float32 scales that
multiply them (layers/fp8.py's convention), one set per local slot:

    block-wise (bn x bk): w13_scale [slots, 2 * I_local / bn, ceil(H / bk)]  (gate blocks, then up)
                          w2_scale  [slots, ceil(H / bn), ceil(I_local / bk)]
    per channel:          w13_scale [slots, 2 * I_local, 1], w2_scale [slots, H, 1]
                          (per-tensor checkpoint scales widened to their rows, as ParallelLinear does)

Block scales are cut with the weight (gate/up rows, down columns), so I_local must be whole bn
blocks (the gate and up halves of w13 stack on a block boundary) and, when expert TP splits
the down projection's columns, whole bk blocks; other sizes are refused naming them. Online
quantization (`--quantization fp8`) loads high precision and quantizes each slot per row in
`finish_loading`. Activations stay in the model's dtype (W8A16): the weights are what makes
MoE decode memory-bound, and a per-tensor static `input_scale` of an expert is therefore not
needed (skipped at load). The reference dequantizes each expert's weights (exactly the model
with dequantized weights); the Triton kernel loads FP8 tiles and applies the scales per K block.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from meshserve.cluster.comm import SINGLE, RankGroup
from meshserve.config.quantization import Fp8Scheme
from meshserve.layers.activation import silu_and_mul
from meshserve.layers.fp8 import FP8, dequantize, fp8_supported, quantize_per_channel

# Checkpoint names of per-expert projections: Mixtral's w1/w3/w2, and gate/up/down elsewhere;
# `weight_scale` is an FP8 weight's scale (the loader renames DeepSeek's `weight_scale_inv`).
_EXPERT_NAME = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)"
                          r"\.(?P<tensor>weight|weight_scale|input_scale)$")
_SHARD_OF = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2", "down_proj": "w2"}


def expert_checkpoint_target(name: str) -> tuple[str, str, int] | None:
    """`...experts.<e>.<proj>.weight` (or `.weight_scale`) -> (stacked parameter name, shard id,
    expert id); None for any other name."""
    match = _EXPERT_NAME.match(name)
    if match is None or match["tensor"] == "input_scale":
        return None
    shard = _SHARD_OF[match["proj"]]
    param = ("w2" if shard == "w2" else "w13") + ("_scale" if match["tensor"] == "weight_scale" else "")
    return f"{match['prefix']}.{param}", shard, int(match["expert"])


def unused_expert_tensor(name: str) -> bool:
    """An expert's static activation scale (`...experts.<e>.<proj>.input_scale`): W8A16 experts
    do not quantize activations, so the loader skips it."""
    match = _EXPERT_NAME.match(name)
    return match is not None and match["tensor"] == "input_scale"


class FusedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype,
                 tp: RankGroup = SINGLE, local_experts: Sequence[int] | None = None,
                 fp8: Fp8Scheme | None = None) -> None:
        """`local_experts`: the logical expert of each local slot; default every expert, in order."""
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.local_experts = list(range(num_experts) if local_experts is None else local_experts)
        self.num_local = len(self.local_experts)
        _, self.intermediate_local = tp.shard(intermediate_size)
        self.fp8 = fp8
        self.block = fp8.block if fp8 is not None else None
        if self.block is not None:
            _check_whole_blocks(self.block, intermediate_size, self.intermediate_local, tp.size)
        stored = FP8 if fp8 is not None and not fp8.online else dtype
        n, e = self.intermediate_local, self.num_local
        self.w13 = nn.Parameter(torch.empty(e, 2 * n, hidden_size, dtype=stored), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(e, hidden_size, n, dtype=stored), requires_grad=False)
        if self.w13.is_cuda and fp8 is not None:
            _check_cuda_kernel(self.w13.device, self.block)
        self.w13_scale: nn.Parameter | None = None
        self.w2_scale: nn.Parameter | None = None
        if stored == FP8:
            if self.block is None:
                w13_scale, w2_scale = (e, 2 * n, 1), (e, hidden_size, 1)
            else:
                bn, bk = self.block
                w13_scale, w2_scale = (e, 2 * n // bn, -(-hidden_size // bk)), (e, -(-hidden_size // bn), -(-n // bk))
            self.w13_scale = nn.Parameter(torch.empty(w13_scale, dtype=torch.float32), requires_grad=False)
            self.w2_scale = nn.Parameter(torch.empty(w2_scale, dtype=torch.float32), requires_grad=False)
        for param in self.parameters():
            param.weight_loader = self.weight_loader
        self._loaded: set[tuple[str, int]] = set()  # (shard id [+ "_scale"], local slot) filled from the checkpoint
        # [0]: pairs of other ranks' slots (id -1), then one counter per local slot.
        self.register_buffer("load", torch.zeros(self.num_local + 1, dtype=torch.int64), persistent=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"checkpoint has expert {expert_id}, the config says {self.num_experts} experts")
        scale = param is self.w13_scale or param is self.w2_scale
        for slot, expert in enumerate(self.local_experts):
            if expert != expert_id:
                continue  # another expert (the others' slots are on other expert-parallel ranks)
            if scale:
                self._load_scale(param.data[slot], loaded, shard_id, expert_id)
            else:
                n = self.intermediate_local
                start = self.tp.rank * n
                if shard_id == "w2":
                    dst, src = param.data[slot], loaded.narrow(1, start, n)
                else:
                    dst = param.data[slot].narrow(0, 0 if shard_id == "w1" else n, n)
                    src = loaded.narrow(0, start, n)
                _copy(dst, src, f"expert {expert_id} {shard_id}")
            self._loaded.add((f"{shard_id}_scale" if scale else shard_id, slot))

    def _load_scale(self, dst: torch.Tensor, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        """One slot's scales of projection `shard_id`, cut as its weight is: this rank's rows of
        gate/up, its columns of down (in whole blocks, checked at construction)."""
        n = self.intermediate_local
        start = self.tp.rank * n
        what = f"expert {expert_id} {shard_id} scale"
        if shard_id != "w2":  # this projection's half of w13's scale rows
            rows = n // self.block[0] if self.block is not None else n
            dst = dst.narrow(0, 0 if shard_id == "w1" else rows, rows)
        if loaded.numel() == 1:  # per tensor: every row of this projection gets it
            dst.fill_(loaded.reshape(()).item())
        elif self.block is not None:
            bn, bk = self.block
            src = loaded.narrow(1, start // bk, dst.shape[1]) if shard_id == "w2" else \
                loaded.narrow(0, start // bn, n // bn)
            _copy(dst, src, what)
        else:  # per channel: down keeps all its rows, gate/up take this rank's
            loaded = loaded.reshape(-1, 1)
            _copy(dst, loaded if shard_id == "w2" else loaded.narrow(0, start, n), what)

    def check_loaded(self) -> None:
        """After loading: every local slot got its expert's three projections, and their scales
        when FP8 (a checkpoint missing one would otherwise serve uninitialised memory)."""
        parts = ("w1", "w2", "w3") + (("w1_scale", "w2_scale", "w3_scale") if self.w13_scale is not None else ())
        missing = sorted({self.local_experts[slot] for slot in range(self.num_local) for s in parts
                          if (s, slot) not in self._loaded})
        if missing:
            raise ValueError(f"the checkpoint lacks projections{' or their FP8 scales' if len(parts) > 3 else ''} "
                             f"of experts {missing[:8]}" + (" ..." if len(missing) > 8 else ""))

    def slot_tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed by local slot (the weights, and FP8 scales), as what moving an
        expert to another slot copies (eplb.move_experts); FP8 weights as their bytes, which every
        collective backend can send (gloo has no float8 type)."""
        params = (self.w13, self.w2, self.w13_scale, self.w2_scale)
        return [p.data.view(torch.uint8) if p.dtype == FP8 else p.data for p in params if p is not None]

    def finish_loading(self) -> None:
        """Online FP8 (`--quantization fp8`): quantize every local slot per output row."""
        if self.fp8 is None or not self.fp8.online:
            return
        for name in ("w13", "w2"):
            weight = getattr(self, name).data
            w8 = torch.empty(weight.shape, dtype=FP8, device=weight.device)
            scale = torch.empty((*weight.shape[:2], 1), dtype=torch.float32, device=weight.device)
            for slot in range(self.num_local):  # one slot at a time: the float32 temporaries stay one expert's
                w8[slot], scale[slot] = quantize_per_channel(weight[slot])
            setattr(self, name, nn.Parameter(w8, requires_grad=False))
            setattr(self, f"{name}_scale", nn.Parameter(scale, requires_grad=False))

    def take_load(self) -> torch.Tensor:
        """Pairs per local slot since the last call [num_local] (device), and restart the count."""
        counts = self.load[1:].clone()
        self.load.zero_()
        return counts

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights, local ids [T, top_k] (-1: not on this rank) -> sum over each token's
        local experts of weight * expert(x), [T, H] in x's dtype: a partial sum whenever moe_tp or
        moe_ep has more than one rank (the block reduces)."""
        scales = None if self.w13_scale is None else ExpertScales(self.w13_scale, self.w2_scale, self.block)
        if x.is_cuda:
            from meshserve.layers.moe.grouped_gemm import fused_experts

            return fused_experts(x, self.w13, self.w2, weights, ids, scales, load=self.load)  # counts as it sorts
        flat = ids.flatten() + 1
        self.load.index_add_(0, flat, torch.ones_like(flat))
        return experts_reference(x, self.w13, self.w2, weights, ids, scales)


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{what}: checkpoint shard has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
    dst.copy_(src)


def _check_whole_blocks(block: tuple[int, int], intermediate: int, local: int, tp: int) -> None:
    bn, bk = block
    if local % bn or (tp > 1 and local % bk):
        raise ValueError(
            f"FP8 expert blocks of {bn}x{bk} do not cut the experts' intermediate size {intermediate} into whole "
            f"blocks per rank ({local} per rank under expert tensor parallelism {tp}): the gate and up halves "
            f"need multiples of {bn}" + (f", the down projection's column slices multiples of {bk}" if tp > 1 else "")
            + "; use an --ep / --tp combination whose expert TP size gives whole blocks")


def _check_cuda_kernel(device: torch.device, block: tuple[int, int] | None) -> None:
    """What the FP8 expert kernel (grouped_gemm.py) needs on CUDA."""
    if not fp8_supported(device):
        raise ValueError("FP8 MoE experts on CUDA need compute capability >= 8.9 (the expert kernel loads "
                         "float8_e4m3 tiles); serve this GPU with a bf16 checkpoint")
    if block is not None and (block[1] < 16 or block[1] & (block[1] - 1)):
        raise ValueError(f"FP8 expert blocks of {block[0]}x{block[1]}: the CUDA expert kernel needs block columns "
                         "that are a power of two >= 16 (its K tiles lie inside one block)")


@dataclass(frozen=True)
class ExpertScales:
    """The scales of FP8 experts: `block` (bn, bk) block-wise, None per channel (see the module
    docstring for the shapes)."""

    w13: torch.Tensor
    w2: torch.Tensor
    block: tuple[int, int] | None

    def dequantized(self, w13: torch.Tensor, w2: torch.Tensor, expert: int,
                    dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One slot's real weights in `dtype`."""
        return (dequantize(w13[expert], self.w13[expert], self.block).to(dtype),
                dequantize(w2[expert], self.w2[expert], self.block).to(dtype))


def experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor, scales: ExpertScales | None = None) -> torch.Tensor:
    """Plain PyTorch: the (token, expert) pairs sorted by expert, one matmul pair per expert with
    tokens, results weighted and summed into their tokens in expert order; pairs of expert -1
    (held by another rank) are skipped. FP8 experts (`scales`) are dequantized one at a time."""
    top_k = ids.shape[1]
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat + 1, minlength=w13.shape[0] + 1).tolist()
    tokens = order // top_k
    # Weighted and summed in float32, then rounded once, as the CUDA sum kernel (grouped_gemm.py)
    # and transformers' DeepSeek-V3 do; identical to before in float32 models.
    pair_weights = weights.flatten()[order].float()
    out = torch.zeros_like(x, dtype=torch.float32)
    start = counts[0]
    for expert, count in enumerate(counts[1:]):
        if count:
            rows = tokens[start : start + count]
            gate_up, down = (w13[expert], w2[expert]) if scales is None else \
                scales.dequantized(w13, w2, expert, x.dtype)
            h = silu_and_mul(x[rows] @ gate_up.t()) @ down.t()
            out.index_add_(0, rows, h.float() * pair_weights[start : start + count, None])
            start += count
    return out.to(x.dtype)
