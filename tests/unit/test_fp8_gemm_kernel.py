"""The block-wise FP8 GEMM kernel (kernels/fp8_gemm.py) against the dequantized reference, in
Triton's interpreter on the CPU (compiled on CUDA machines): activations quantized per (token,
128 columns) group, weights per 128 x 128 block, ragged output rows, a bias.

Tolerance: the interpreter multiplies in float32, so it must match the float32 reference to
rounding. Compiled for sm_90, a tile of BLOCK_M >= 64 rows (M = 37 here) runs on wgmma, whose FP8
products are summed over each 128-wide K block in the tensor core's own accumulator (Triton's
default `max_num_imprecise_acc` on sm_90 is 2**30: no promotion to float32 inside a tl.dot; about
14 bits are kept, DeepSeek-V3 report section 3.3.2) before the kernel adds the block to its float32
accumulator. Its error is bounded relative to the sum of the absolute products, not to the
output: the H200 showed up to 0.63 on outputs whose absolute-product sums are >= 2440 (2**-12),
against the test's former 1e-3. M = 1 (BLOCK_M = 16, below wgmma's 64 rows) met 1e-3: there
Triton upcasts the FP8 tiles to f16 for mma.sync, which sums in float32. (Both seen in the
kernel compiled for sm_90 on a CPU: wgmma.m64n128k32.f32.e4m3.e4m3 with maxNumImpreciseAcc
2**30 at BLOCK_M = 64, mma.sync.m16n8k16.f32.f16.f16.f32 at 16.)"""

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
    w_real = dequantize(w8, scale, (128, 128))
    expected = x_real @ w_real.T + bias
    if DEVICE == "cpu":
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-3)
    else:  # 2**-10 of the absolute-product sum: 4x the H200's observed FP8 accumulator error
        bound = 2**-10 * (x_real.abs() @ w_real.abs().T) + 1e-3
        assert ((out - expected).abs() <= bound).all(), (out - expected).abs().max()
