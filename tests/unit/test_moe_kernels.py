"""The grouped-GEMM Triton kernel of the routed experts against the plain PyTorch reference, in
Triton's interpreter on the CPU (compiled, on the GPU machine, where these tests run too)."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("tokens", "experts", "top_k", "hidden", "inter"), [(1, 8, 2, 64, 32), (37, 6, 3, 48, 40)])
def test_fused_experts_match_reference(tokens, experts, top_k, hidden, inter):
    from meshserve.layers.moe.experts import experts_reference
    from meshserve.layers.moe.grouped_gemm import fused_experts

    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=gen) * 0.2
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    ids[1::4, -1] = -1  # pairs held by another expert-parallel rank: their rows of y are never written
    ids[2::7] = -1  # tokens with no expert on this rank at all
    weights = torch.rand(tokens, top_k, generator=gen)
    expected = experts_reference(x, w13, w2, weights, ids)
    got = fused_experts(*(t.to(DEVICE) for t in (x, w13, w2, weights, ids)))
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


def test_fused_experts_of_no_tokens():
    """A rank's idle forward: no tokens, nothing launched, an empty [0, H] result."""
    from meshserve.layers.moe.grouped_gemm import fused_experts

    w13, w2 = torch.randn(4, 64, 32, device=DEVICE), torch.randn(4, 32, 32, device=DEVICE)
    load = torch.zeros(5, dtype=torch.int64, device=DEVICE)
    out = fused_experts(torch.empty(0, 32, device=DEVICE), w13, w2, torch.empty(0, 2, device=DEVICE),
                        torch.empty(0, 2, dtype=torch.int64, device=DEVICE), load=load)
    assert out.shape == (0, 32) and not load.any()


@pytest.mark.parametrize("block", [(16, 16), (32, 64), None], ids=["block-16", "block-32x64", "per-channel"])
def test_fp8_fused_experts_match_the_dequantized_reference(block):
    """The W8A16 variant: FP8 weight tiles with their block (or per-row) scales applied per K
    tile, against the reference that dequantizes each expert."""
    from meshserve.layers.fp8 import quantize_blockwise, quantize_per_channel
    from meshserve.layers.moe.experts import ExpertScales, experts_reference
    from meshserve.layers.moe.grouped_gemm import fused_experts

    tokens, experts, top_k, hidden, inter = 19, 4, 2, 128, 64
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(tokens, hidden, generator=gen)
    quantized = []
    for shape in ((experts, 2 * inter, hidden), (experts, hidden, inter)):
        w = torch.randn(*shape, generator=gen) * torch.linspace(0.05, 2.0, shape[2])  # columns of different range
        if block is None:
            quantized.append(quantize_per_channel(w))
        else:
            parts = [quantize_blockwise(w[e], block) for e in range(experts)]
            quantized.append((torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts])))
    (w13, s13), (w2, s2) = quantized
    scales = ExpertScales(s13, s2, block)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    ids[3, 1] = -1  # a pair held by another expert-parallel rank
    weights = torch.rand(tokens, top_k, generator=gen)
    expected = experts_reference(x, w13, w2, weights, ids, scales)
    on = [t.to(DEVICE) for t in (x, w13, w2, weights, ids, s13, s2)]
    got = fused_experts(*on[:5], ExpertScales(on[5], on[6], block))
    # The kernel scales each K tile's float32 product, the reference the weights: rounding only.
    torch.testing.assert_close(got.cpu(), expected, rtol=5e-4, atol=1e-3)
