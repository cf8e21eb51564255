"""FP8 GEMM paths on an FP8 GPU (compute capability >= 8.9), bfloat16 activations: the
torch._scaled_mm path (per-channel weights, per-token or static activation scales) and the
Triton block-wise kernel equal the product of the dequantized FP8 operands to bf16 accuracy, and
a layer picks the path the start-up log names. Each is called directly, at every row count: through
fp8_linear a call of few rows takes the skinny kernel (tests/gpu/test_skinny_gemm.py)."""

from __future__ import annotations

import pytest
import torch

from meshserve.layers.fp8 import (
    dequantize,
    fp8_supported,
    gemm_path,
    quantize_blockwise,
    quantize_per_channel,
    quantize_per_token,
    scaled_mm_linear,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not fp8_supported(torch.device("cuda")),
                                reason="needs a CUDA GPU with FP8 tensor cores")


def _close(out: torch.Tensor, expected: torch.Tensor) -> None:
    # bf16 output: relative error of a few units of its 8-bit mantissa.
    assert ((out.float() - expected).abs().max() / expected.abs().max()).item() < 2**-7


@pytest.mark.parametrize("m", [1, 64, 333])
def test_scaled_mm_per_channel_with_per_token_activations(m):
    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 4096, device="cuda", generator=gen).bfloat16()
    w8, scale = quantize_per_channel(torch.randn(1024, 4096, device="cuda", generator=gen) * 0.02)
    bias = torch.randn(1024, device="cuda", generator=gen).bfloat16()
    out = scaled_mm_linear(x, w8, scale, bias=bias)
    x8, x_scale = quantize_per_token(x)
    _close(out, (x8.float() * x_scale) @ dequantize(w8, scale).T + bias.float())


def test_scaled_mm_with_a_static_input_scale():
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(16, 2048, device="cuda", generator=gen).bfloat16()
    w8, scale = quantize_per_channel(torch.randn(512, 2048, device="cuda", generator=gen))
    input_scale = torch.tensor(x.float().abs().max().item() / 448.0, device="cuda")
    out = scaled_mm_linear(x, w8, scale, bias=None, input_scale=input_scale)
    x_real = (x.float() / input_scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * input_scale
    _close(out, x_real @ dequantize(w8, scale).T)


@pytest.mark.parametrize("m", [1, 64, 300])
def test_triton_block_kernel_bf16(m):
    from meshserve.layers.kernels.fp8_gemm import block_fp8_linear, quantize_groups

    gen = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 7168, device="cuda", generator=gen).bfloat16()
    w8, scale = quantize_blockwise(torch.randn(2112, 7168, device="cuda", generator=gen), (128, 128))
    out = block_fp8_linear(x, w8, scale, (128, 128))
    x8, x_scale = quantize_groups(x, 128)
    x_real = (x8.float().view(m, 56, 128) * x_scale[:, :, None]).view(m, 7168)
    _close(out, x_real @ dequantize(w8, scale, (128, 128)).T)


def test_paths_chosen_on_the_gpu():
    cuda = torch.device("cuda")
    assert gemm_path(cuda, block=None, dtype=torch.bfloat16, in_features=4096, out_features=1024) == "scaled_mm"
    assert gemm_path(cuda, block=None, dtype=torch.float16, in_features=4096, out_features=1024) == "dequant"
    assert gemm_path(cuda, block=None, dtype=torch.bfloat16, in_features=4096, out_features=1000) == "dequant"
    assert gemm_path(cuda, block=(128, 128), dtype=torch.bfloat16, in_features=7168, out_features=100) == "triton_block"
    assert gemm_path(cuda, block=(128, 128), dtype=torch.bfloat16, in_features=100, out_features=128) == "dequant"
