"""Token routing of a mixture-of-experts block: a replicated gate (hidden -> one logit per
expert), then a scoring function and a top-k choice.

The variants of the supported models, all as their reference implementations compute them (in
float32, whatever the model dtype):

* softmax, top-k (Mixtral, Qwen2-MoE, Qwen3-MoE, DeepSeek-V2 `greedy`), with or without
  renormalising the chosen weights (`norm_topk_prob`);
* softmax, group-limited top-k (DeepSeek-V2 `group_limited_greedy`): experts form `num_groups`
  groups, a group scores as its best expert, only the `topk_groups` best groups compete;
* sigmoid with a learned `e_score_correction_bias` (DeepSeek-V3 `noaux_tc`): the bias steers the
  choice only (groups score as the sum of their two best biased scores), the weights are the
  unbiased sigmoid scores of the chosen experts, renormalised;

and finally the weights are multiplied by `routed_scaling_factor`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

SCORING_FUNCTIONS = ("softmax", "sigmoid")
GROUP_SCORES = ("max", "top2_sum")


@dataclass(frozen=True)
class Routing:
    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = False
    scaling_factor: float = 1.0
    num_groups: int = 1  # 1: plain top-k over every expert
    topk_groups: int = 1
    group_score: str = "max"
    correction_bias: bool = False  # the gate holds e_score_correction_bias (DeepSeek-V3)

    def __post_init__(self) -> None:
        if self.scoring not in SCORING_FUNCTIONS:
            raise ValueError(f"MoE scoring function {self.scoring!r} is not supported "
                             f"(supported: {', '.join(SCORING_FUNCTIONS)})")
        if self.group_score not in GROUP_SCORES:
            raise ValueError(f"MoE group score {self.group_score!r} is not supported")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top-{self.top_k} routing over {self.num_experts} experts")
        if self.num_experts % self.num_groups or not 0 < self.topk_groups <= self.num_groups:
            raise ValueError(f"{self.num_experts} experts in {self.num_groups} groups, "
                             f"top {self.topk_groups} groups: not a valid grouping")

    def select(self, logits: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [T, E] float32 -> (weights [T, top_k] float32, expert ids [T, top_k] int64).
        On CUDA: one Triton launch (routing_kernel.py), the same function; below, the reference."""
        if logits.is_cuda:
            from meshserve.layers.moe.routing_kernel import select_top_k

            return select_top_k(logits, self, bias)
        scores = logits.softmax(dim=-1) if self.scoring == "softmax" else logits.sigmoid()
        choice = scores if bias is None else scores + bias
        if self.num_groups > 1:
            grouped = choice.view(choice.shape[0], self.num_groups, -1)
            group_scores = grouped.max(dim=-1).values if self.group_score == "max" \
                else grouped.topk(2, dim=-1).values.sum(dim=-1)
            kept = group_scores.topk(self.topk_groups, dim=-1).indices
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
            choice = choice.masked_fill(~keep.repeat_interleave(self.num_experts // self.num_groups, dim=1),
                                        float("-inf"))
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scaling_factor != 1.0:
            weights = weights * self.scaling_factor
        return weights, ids


class TopKRouter(nn.Module):
    """The gate: replicated on every rank (each rank routes every token it holds)."""

    def __init__(self, hidden_size: int, routing: Routing, *, dtype: torch.dtype) -> None:
        super().__init__()
        self.routing = routing
        self.model_dtype = dtype
        # The logits are computed in float32 from the model-dtype weight (the reference's way):
        # the weight is stored widened once, at load, rather than per step (a kernel per layer).
        self.weight = nn.Parameter(torch.empty(routing.num_experts, hidden_size, dtype=torch.float32),
                                   requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        # The correction bias stays float32 in any model dtype (it separates scores ~1e-3 apart).
        self.e_score_correction_bias = nn.Parameter(torch.zeros(routing.num_experts, dtype=torch.float32),
                                                    requires_grad=False) if routing.correction_bias else None

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """The checkpoint's gate rounded to the model's dtype (as a model-dtype parameter would
        hold it), kept in float32."""
        if param.shape != loaded.shape:
            raise ValueError(f"MoE gate: checkpoint tensor has shape {tuple(loaded.shape)}, "
                             f"expected {tuple(param.shape)}")
        param.data.copy_(loaded.to(self.model_dtype))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights [T, top_k] float32, expert ids [T, top_k])."""
        logits = F.linear(x.float(), self.weight)
        return self.routing.select(logits, self.e_score_correction_bias)
