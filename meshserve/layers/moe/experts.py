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
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from meshserve.cluster.comm import SINGLE, RankGroup
from meshserve.layers.activation import silu_and_mul

# Checkpoint names of per-expert projections: Mixtral's w1/w3/w2, and gate/up/down elsewhere.
_EXPERT_NAME = re.compile(r"^(?P<prefix>.*\.experts)\.(?P<expert>\d+)\.(?P<proj>w1|w2|w3|gate_proj|up_proj|down_proj)"
                          r"\.weight$")
_SHARD_OF = {"w1": "w1", "gate_proj": "w1", "w3": "w3", "up_proj": "w3", "w2": "w2", "down_proj": "w2"}


def expert_checkpoint_target(name: str) -> tuple[str, str, int] | None:
    """`...experts.<e>.<proj>.weight` -> (stacked parameter name, shard id, expert id); None for
    any other name."""
    match = _EXPERT_NAME.match(name)
    if match is None:
        return None
    shard = _SHARD_OF[match["proj"]]
    return f"{match['prefix']}.{'w2' if shard == 'w2' else 'w13'}", shard, int(match["expert"])


class FusedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, dtype: torch.dtype,
                 tp: RankGroup = SINGLE, local_experts: Sequence[int] | None = None) -> None:
        """`local_experts`: the logical expert of each local slot; default every expert, in order."""
        super().__init__()
        self.tp = tp
        self.num_experts = num_experts
        self.local_experts = list(range(num_experts) if local_experts is None else local_experts)
        self.num_local = len(self.local_experts)
        _, self.intermediate_local = tp.shard(intermediate_size)
        self.w13 = nn.Parameter(torch.empty(self.num_local, 2 * self.intermediate_local, hidden_size, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_local, hidden_size, self.intermediate_local, dtype=dtype),
                               requires_grad=False)
        self.w13.weight_loader = self.weight_loader
        self.w2.weight_loader = self.weight_loader
        self._loaded: set[tuple[str, int]] = set()  # (shard id, local slot) filled from the checkpoint
        # [0]: pairs of other ranks' slots (id -1), then one counter per local slot.
        self.register_buffer("load", torch.zeros(self.num_local + 1, dtype=torch.int64), persistent=False)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str, expert_id: int) -> None:
        if not 0 <= expert_id < self.num_experts:
            raise ValueError(f"checkpoint has expert {expert_id}, the config says {self.num_experts} experts")
        n = self.intermediate_local
        start = self.tp.rank * n
        for slot, expert in enumerate(self.local_experts):
            if expert != expert_id:
                continue  # another expert (the others' slots are on other expert-parallel ranks)
            if shard_id == "w2":
                dst, src = param.data[slot], loaded.narrow(1, start, n)
            else:
                dst = param.data[slot].narrow(0, 0 if shard_id == "w1" else n, n)
                src = loaded.narrow(0, start, n)
            if dst.shape != src.shape:
                raise ValueError(f"expert {expert_id} {shard_id}: checkpoint shard has shape {tuple(src.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(src)
            self._loaded.add((shard_id, slot))

    def check_loaded(self) -> None:
        """After loading: every local slot got its expert's three projections (a checkpoint
        missing one would otherwise serve uninitialised memory)."""
        missing = sorted({self.local_experts[slot] for slot in range(self.num_local) for s in ("w1", "w2", "w3")
                          if (s, slot) not in self._loaded})
        if missing:
            raise ValueError(f"the checkpoint lacks projections of experts {missing[:8]}"
                             + (" ..." if len(missing) > 8 else ""))

    def take_load(self) -> torch.Tensor:
        """Pairs per local slot since the last call [num_local] (device), and restart the count."""
        counts = self.load[1:].clone()
        self.load.zero_()
        return counts

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """x [T, H]; weights, local ids [T, top_k] (-1: not on this rank) -> sum over each token's
        local experts of weight * expert(x), [T, H] in x's dtype: a partial sum whenever moe_tp or
        moe_ep has more than one rank (the block reduces)."""
        flat = ids.flatten() + 1
        self.load.index_add_(0, flat, torch.ones_like(flat))
        if x.is_cuda:
            from meshserve.layers.moe.grouped_gemm import fused_experts

            return fused_experts(x, self.w13, self.w2, weights, ids)
        return experts_reference(x, self.w13, self.w2, weights, ids)


def experts_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                      ids: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: the (token, expert) pairs sorted by expert, one matmul pair per expert with
    tokens, results weighted and summed into their tokens in expert order; pairs of expert -1
    (held by another rank) are skipped."""
    top_k = ids.shape[1]
    flat = ids.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat + 1, minlength=w13.shape[0] + 1).tolist()
    tokens = order // top_k
    pair_weights = weights.flatten()[order].to(x.dtype)
    out = torch.zeros_like(x)
    start = counts[0]
    for expert, count in enumerate(counts[1:]):
        if count:
            rows = tokens[start : start + count]
            h = silu_and_mul(x[rows] @ w13[expert].t()) @ w2[expert].t()
            out.index_add_(0, rows, h * pair_weights[start : start + count, None])
            start += count
    return out
