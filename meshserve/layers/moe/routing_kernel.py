"""Routing's scoring and top-k choice (router.py's `Routing.select`) in one Triton launch, one
program per token, instead of the torch kernels of the reference (softmax, topk, gather, sum,
add, divide; a dozen more with expert groups) — a fixed per-layer cost that matters at decode.

The same function as the reference, in float32: scores = softmax or sigmoid of the logits;
choice = scores (+ the correction bias); with expert groups, a group scores as its best choice
(or the sum of its two best) and only the topk_groups best groups compete; the experts are the
top_k of the choice, best first, an exact tie going to the lower id (group or expert); weights =
their unbiased scores, renormalised (sum + 1e-20) when asked, times the scaling factor. The
scores' rounding may differ from torch's by an ulp, so a choice between scores that tie to within
rounding may differ from the reference (as it may between two torch builds).

The program holds the logits as [groups, experts per group] (one row without groups), each
dimension padded to a power of two, so group reductions are row reductions.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from meshserve.layers.moe.router import Routing


@triton.jit
def _select_kernel(Logits, Bias, Weights, Ids, num_groups, per_group, stride_logits, scaling_factor,
                   TOP_K: tl.constexpr, TOPK_GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_PER: tl.constexpr,
                   BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr, HAS_BIAS: tl.constexpr, GROUPED: tl.constexpr,
                   TOP2_GROUP_SCORE: tl.constexpr, RENORMALIZE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    group = tl.arange(0, BLOCK_G)
    within = tl.arange(0, BLOCK_PER)
    mask = (group < num_groups)[:, None] & (within < per_group)[None, :]
    expert = group[:, None] * per_group + within[None, :]
    logits = tl.load(Logits + token * stride_logits + expert, mask=mask, other=float("-inf"))
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        exp = tl.exp(logits - tl.max(tl.max(logits, 1), 0))
        scores = exp / tl.sum(tl.sum(exp, 1), 0)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(Bias + expert, mask=mask, other=0.0)
    choice = tl.where(mask, choice, float("-inf"))
    if GROUPED:
        group_score = tl.max(choice, 1)
        if TOP2_GROUP_SCORE:  # the best plus the best of the rest (twice the best when two tie)
            first = tl.argmax(choice, 1, tie_break_left=True)
            group_score += tl.max(tl.where(within[None, :] == first[:, None], float("-inf"), choice), 1)
        group_score = tl.where(group < num_groups, group_score, float("-inf"))
        keep = group < 0  # all false
        for _ in tl.static_range(TOPK_GROUPS):
            best = tl.argmax(group_score, 0, tie_break_left=True)
            keep |= group == best
            group_score = tl.where(group == best, float("-inf"), group_score)
        choice = tl.where(keep[:, None], choice, float("-inf"))
    # Flat over [group, within]: index order is expert order, so ties still go to the lower id.
    choice = tl.reshape(choice, [BLOCK_G * BLOCK_PER])
    scores = tl.reshape(scores, [BLOCK_G * BLOCK_PER])
    expert = tl.reshape(expert, [BLOCK_G * BLOCK_PER])
    flat = tl.arange(0, BLOCK_G * BLOCK_PER)
    slots = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.argmax(choice, 0, tie_break_left=True)
        weights = tl.where(slots == k, tl.sum(tl.where(flat == best, scores, 0.0), 0), weights)
        ids = tl.where(slots == k, tl.sum(tl.where(flat == best, expert, 0), 0), ids)
        choice = tl.where(flat == best, float("-inf"), choice)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, 0) + 1e-20)
    weights *= scaling_factor
    tl.store(Weights + token * TOP_K + slots, weights, mask=slots < TOP_K)
    tl.store(Ids + token * TOP_K + slots, ids, mask=slots < TOP_K)


def select_top_k(logits: torch.Tensor, routing: Routing,
                 bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 -> (weights [T, top_k] float32, expert ids [T, top_k] int64)."""
    tokens, experts = logits.shape
    assert logits.stride(-1) == 1 and experts == routing.num_experts
    weights = torch.empty(tokens, routing.top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, routing.top_k, dtype=torch.int64, device=logits.device)
    if tokens:
        per_group = experts // routing.num_groups
        _select_kernel[(tokens,)](
            logits, logits if bias is None else bias, weights, ids, routing.num_groups, per_group, logits.stride(0),
            routing.scaling_factor,
            TOP_K=routing.top_k, TOPK_GROUPS=routing.topk_groups, BLOCK_G=triton.next_power_of_2(routing.num_groups),
            BLOCK_PER=triton.next_power_of_2(per_group), BLOCK_K=triton.next_power_of_2(routing.top_k),
            SIGMOID=routing.scoring == "sigmoid", HAS_BIAS=bias is not None, GROUPED=routing.num_groups > 1,
            TOP2_GROUP_SCORE=routing.group_score == "top2_sum", RENORMALIZE=routing.renormalize)
    return weights, ids
