"""The sparse MoE block: route, map each logical choice to a physical expert slot (placement.py),
run the routed experts (over expert-parallel ranks through the dispatcher, dispatch.py), add the shared experts (DeepSeek's always-on experts; Qwen2-MoE's one
shared expert behind a sigmoid gate), and sum the partial outputs over the dispatcher's group."""

from __future__ import annotations

import torch
from torch import nn

from meshserve.cluster.groups import ParallelGroups
from meshserve.config.quantization import Fp8Scheme
from meshserve.layers.linear import layer_fp8
from meshserve.layers.moe.dispatch import make_dispatch
from meshserve.layers.moe.experts import FusedExperts
from meshserve.layers.moe.placement import ExpertPlacement
from meshserve.layers.moe.router import Routing, TopKRouter


class SparseMoeBlock(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, routing: Routing, *, dtype: torch.dtype,
                 groups: ParallelGroups, shared: nn.Module | None = None, shared_gate: bool = False,
                 quant: Fp8Scheme | None = None, prefix: str = "") -> None:
        """`shared`: the shared experts as a dense (tensor-parallel, self-reducing) MLP; with
        `shared_gate` its output is scaled by sigmoid(x . shared_expert_gate) (Qwen2-MoE).
        `quant`: FP8 routed experts unless the scheme keeps `<prefix>.experts` (the checkpoint
        module name) in high precision; the router gate is never FP8 (model-dtype values, held in float32)."""
        super().__init__()
        self.gate = TopKRouter(hidden_size, routing, dtype=dtype)
        self.placement = ExpertPlacement(routing.num_experts, groups.ep_num_redundant_experts, groups.moe_ep)
        self.experts = FusedExperts(routing.num_experts, hidden_size, intermediate_size, dtype=dtype,
                                    tp=groups.moe_tp, local_experts=self.placement.local_experts,
                                    fp8=layer_fp8(quant, [f"{prefix}.experts"]))
        self.dispatch = make_dispatch(groups.moe_a2a_backend, tp=groups.tp, moe_ep=groups.moe_ep,
                                      moe_tp=groups.moe_tp)
        self.shared = shared
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, dtype=dtype) if shared_gate else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        slots = self.placement.physical(ids)
        partial = self.dispatch.run(x, weights, slots, self.experts, self.placement.first_slot, self.placement.num_local)
        out = self.dispatch.reduce_group.all_reduce(partial)
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
