"""The block-wise FP8 GEMM kernel (kernels/fp8_gemm.py) against the dequantized reference, in
Triton's interpreter on the CPU (compiled on CUDA machines): activations quantized per (token,
128 columns) group, weights per 128 x 128 block, ragged output rows, a bias."""

from __future__ import annotations

import os

import pytest
import torch

from meshserve.layers.fp8 import dequantize, quantize_blockwise

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("m", [1, 37])
def test_block_fp8_gemm_equals_dequantized_product(m):
    from meshserve.layers.kernels.fp8_gemm import block_fp8_linear, quantize_groups

    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=gen).to(DEVICE)
    x[:, :128] *= 50.0  # groups of very different range get their own scales
    w8, scale = quantize_blockwise(torch.randn(200, 256, generator=gen).to(DEVICE), (128, 128))
    bias = torch.randn(200, generator=gen).to(DEVICE)
    out = block_fp8_linear(x, w8, scale, (128, 128), bias)
    x8, x_scale = quantize_groups(x, 128)
    assert torch.equal(x_scale, (x.view(m, 2, 128).abs().amax(-1) / 448.0))
    x_real = (x8.float().view(m, 2, 128) * x_scale[:, :, None]).view(m, 256)
    assert (x_real - x).abs().max() <= 2**-4 * x.abs().max()  # the activation quantization is fp8-accurate
    expected = x_real @ dequantize(w8, scale, (128, 128)).T + bias
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)
