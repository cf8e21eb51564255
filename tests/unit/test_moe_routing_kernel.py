"""The one-launch routing kernel (layers/moe/routing_kernel.py, Triton's interpreter on the CPU,
compiled on the GPU machine) against the torch reference of Routing.select over random logits,
for every routing variant of the supported models."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

VARIANTS = {
    "qwen3-moe": dict(num_experts=128, top_k=8, renormalize=True),
    "mixtral": dict(num_experts=8, top_k=2, renormalize=True),
    "qwen2-moe": dict(num_experts=60, top_k=4),
    "deepseek-v2-lite-greedy-scaled": dict(num_experts=64, top_k=6, scaling_factor=2.5),
    "deepseek-v2-group-limited": dict(num_experts=160, top_k=6, num_groups=8, topk_groups=3, scaling_factor=16.0),
    "deepseek-v3-noaux-tc": dict(num_experts=256, top_k=8, scoring="sigmoid", renormalize=True, scaling_factor=2.5,
                                 num_groups=8, topk_groups=4, group_score="top2_sum", correction_bias=True),
    "sigmoid-one-expert": dict(num_experts=5, top_k=1, scoring="sigmoid"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kernel_selects_as_the_reference(variant):
    from meshserve.layers.moe.router import Routing
    from meshserve.layers.moe.routing_kernel import select_top_k

    routing = Routing(**VARIANTS[variant])
    gen = torch.Generator().manual_seed(routing.num_experts)
    logits = torch.randn(33, routing.num_experts, generator=gen) * 3
    bias = torch.randn(routing.num_experts, generator=gen) * 0.1 if routing.correction_bias else None
    expected_weights, expected_ids = routing.select(logits, bias)  # CPU: the torch reference
    weights, ids = select_top_k(logits.to(DEVICE), routing, None if bias is None else bias.to(DEVICE))
    assert ids.dtype == torch.int64 and torch.equal(ids.cpu(), expected_ids)
    torch.testing.assert_close(weights.cpu(), expected_weights, rtol=1e-5, atol=1e-6)


def test_group_limit_excludes_a_better_expert_of_a_losing_group():
    """Group-limited routing is not plain top-k: expert 0 holds the best score, but its group's
    two best sum below the other groups', so it is not chosen (the reference agrees)."""
    from meshserve.layers.moe.router import Routing
    from meshserve.layers.moe.routing_kernel import select_top_k

    routing = Routing(8, 2, scoring="sigmoid", num_groups=4, topk_groups=2, group_score="top2_sum")
    logits = torch.tensor([[5.0, -5.0, 1.0, 0.95, 0.9, 0.9, 0.8, 0.8]])
    weights, ids = select_top_k(logits.to(DEVICE), routing, None)
    assert ids.tolist() == routing.select(logits)[1].tolist() == [[2, 3]]
    torch.testing.assert_close(weights.cpu(), routing.select(logits)[0])


def test_no_tokens():
    from meshserve.layers.moe.router import Routing
    from meshserve.layers.moe.routing_kernel import select_top_k

    weights, ids = select_top_k(torch.empty(0, 16, device=DEVICE), Routing(16, 4), None)
    assert weights.shape == ids.shape == (0, 4)
