"""The one-launch routing kernel (layers/moe/routing_kernel.py, Triton's interpreter on the CPU,
compiled on the GPU machine) against the torch reference of Routing.select over random logits."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("experts", "top_k", "scoring", "renormalize", "scaling", "bias"), [
    (128, 8, "softmax", True, 1.0, False),    # Qwen3-MoE
    (8, 2, "softmax", True, 1.0, False),      # Mixtral
    (60, 4, "softmax", False, 1.0, False),    # Qwen2-MoE
    (64, 6, "softmax", False, 2.5, False),    # DeepSeek-V2 greedy, scaled
    (256, 8, "sigmoid", True, 2.5, True),     # DeepSeek-V3's scoring without groups
    (5, 1, "sigmoid", False, 1.0, False),
])
def test_kernel_selects_as_the_reference(experts, top_k, scoring, renormalize, scaling, bias):
    from meshserve.layers.moe.router import Routing
    from meshserve.layers.moe.routing_kernel import select_top_k

    routing = Routing(experts, top_k, scoring=scoring, renormalize=renormalize, scaling_factor=scaling)
    gen = torch.Generator().manual_seed(experts)
    logits = torch.randn(33, experts, generator=gen) * 3
    correction = torch.randn(experts, generator=gen) * 0.1 if bias else None
    expected_weights, expected_ids = routing.select(logits, correction)  # CPU: the torch reference
    weights, ids = select_top_k(logits.to(DEVICE), top_k, sigmoid=scoring == "sigmoid",
                                bias=None if correction is None else correction.to(DEVICE),
                                renormalize=renormalize, scaling_factor=scaling)
    assert ids.dtype == torch.int64 and torch.equal(ids.cpu(), expected_ids)
    torch.testing.assert_close(weights.cpu(), expected_weights, rtol=1e-5, atol=1e-6)


def test_no_tokens():
    from meshserve.layers.moe.routing_kernel import select_top_k

    weights, ids = select_top_k(torch.empty(0, 16, device=DEVICE), 4, sigmoid=False, bias=None, renormalize=True,
                                scaling_factor=1.0)
    assert weights.shape == ids.shape == (0, 4)
