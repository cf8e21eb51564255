"""Routing's scoring and top-k choice (router.py's `Routing.select` without expert groups) in one
Triton launch, one program per token, instead of the half-dozen torch kernels of the reference
(softmax, topk, gather, sum, add, divide) — a fixed per-layer cost that matters at decode.

The same function as the reference, in float32: scores = softmax or sigmoid of the logits; the
choice is the top_k of scores (+ the correction bias when given), best first, an exact tie going
to the lower expert id; weights = the chosen unbiased scores, renormalised (sum + 1e-20) when
asked, times the scaling factor. Floating-point rounding of the scores may differ from torch's
by an ulp, so a choice between scores that tie to within rounding may differ from the reference
(as two torch builds may).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _select_kernel(Logits, Bias, Weights, Ids, num_experts, stride_logits, scaling_factor,
                   TOP_K: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, SIGMOID: tl.constexpr,
                   HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < num_experts
    logits = tl.load(Logits + token * stride_logits + offs, mask=mask, other=float("-inf"))
    if SIGMOID:
        scores = 1.0 / (1.0 + tl.exp(-logits))
    else:
        exp = tl.exp(logits - tl.max(logits, 0))
        scores = exp / tl.sum(exp, 0)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(Bias + offs, mask=mask, other=0.0)
    choice = tl.where(mask, choice, float("-inf"))
    slots = tl.arange(0, BLOCK_K)
    weights = tl.zeros([BLOCK_K], dtype=tl.float32)
    ids = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.argmax(choice, 0, tie_break_left=True)
        weights = tl.where(slots == k, tl.sum(tl.where(offs == best, scores, 0.0), 0), weights)
        ids = tl.where(slots == k, best, ids)
        choice = tl.where(offs == best, float("-inf"), choice)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, 0) + 1e-20)
    weights *= scaling_factor
    tl.store(Weights + token * TOP_K + slots, weights, mask=slots < TOP_K)
    tl.store(Ids + token * TOP_K + slots, ids, mask=slots < TOP_K)


def select_top_k(logits: torch.Tensor, top_k: int, *, sigmoid: bool, bias: torch.Tensor | None, renormalize: bool,
                 scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] float32 -> (weights [T, top_k] float32, expert ids [T, top_k] int64)."""
    tokens, experts = logits.shape
    assert logits.stride(-1) == 1
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(tokens, top_k, dtype=torch.int64, device=logits.device)
    if tokens:
        _select_kernel[(tokens,)](
            logits, logits if bias is None else bias, weights, ids, experts, logits.stride(0), scaling_factor,
            TOP_K=top_k, BLOCK_E=triton.next_power_of_2(experts), BLOCK_K=triton.next_power_of_2(top_k),
            SIGMOID=sigmoid, HAS_BIAS=bias is not None, RENORMALIZE=renormalize)
    return weights, ids
