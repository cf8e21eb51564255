"""The skinny GEMM on an FP8 (sm_89+) GPU at Llama-3.1-8B's decode shapes, bfloat16 activations
(which the CPU interpreter cannot check): FP8 weights with per-row and 128 x 128 block scales, and
bf16 weights, equal the float32 product of the activations and the (dequantized) weight to
bfloat16 accuracy; it replays in a CUDA graph; fp8_linear takes it for at most SKINNY_MAX_M rows
and the FP8 x FP8 GEMMs above, dense_linear for at most dense.SKINNY_MAX_M rows on sm_90+.

With programmatic dependent launch (sm_90+, as dense_linear asks for it), a chain of GEMMs and the
kernels between them (RMSNorm, SiLU·mul), captured in a CUDA graph, must give bit for bit what
the same chain gives launched without it; a missing wait would read a stale input."""

from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from meshserve.layers.fp8 import (
    SKINNY_MAX_M,
    dequantize,
    fp8_linear,
    fp8_supported,
    quantize_blockwise,
    quantize_per_channel,
    scaled_mm_linear,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not fp8_supported(torch.device("cuda")),
                                reason="needs a CUDA GPU with FP8 tensor cores")
SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # qkv, o, gate_up, down


def _weight(n: int, k: int, block: tuple[int, int] | None, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.randn(n, k, device="cuda", generator=torch.Generator(device="cuda").manual_seed(seed)) * 0.02
    return quantize_per_channel(w) if block is None else quantize_blockwise(w, block)


def _check(out: torch.Tensor, x: torch.Tensor, w_real: torch.Tensor, bias: torch.Tensor | None) -> None:
    # bfloat16 output rounding (2**-9, with margin) plus tensor-core float32 summation error.
    expected = x.float() @ w_real.T + (0 if bias is None else bias.float())
    bound = 2**-8 * expected.abs() + 2**-16 * (x.float().abs() @ w_real.abs().T)
    err = (out.float() - expected).abs()
    assert (err <= bound).all(), f"{(err > bound).sum().item()} of {err.numel()} outside, worst {err.max().item()}"


@pytest.mark.parametrize("block", [None, (128, 128)], ids=["per_row", "block"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_llama_8b_shapes(n, k, block):
    from meshserve.layers.kernels.skinny_gemm import skinny_linear

    w8, scale = _weight(n, k, block, seed=n + k)
    w_real = dequantize(w8, scale, block)
    gen = torch.Generator(device="cuda").manual_seed(n)
    bias = torch.randn(n, device="cuda", generator=gen).bfloat16()
    for m in (1, 4, 16, 64):
        x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
        x[:, :32] *= 20.0
        _check(skinny_linear(x, w8, scale, bias, block), x, w_real, bias)


def test_cuda_graph_replay():
    """Captured once, replayed with new activations in the same buffer: the output of each
    replay equals an eager call (no host sync or per-call state in the launch)."""
    from meshserve.layers.kernels.skinny_gemm import skinny_linear

    w8, scale = _weight(4096, 14336, None, seed=1)  # split over K: two kernels per call
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 14336, device="cuda", generator=gen).bfloat16()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        skinny_linear(x, w8, scale)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = skinny_linear(x, w8, scale)
    for _ in range(3):
        x.copy_(torch.randn(8, 14336, device="cuda", generator=gen))
        graph.replay()
        assert torch.equal(out, skinny_linear(x, w8, scale))


@pytest.mark.parametrize("block", [None, (128, 128)], ids=["per_row", "block"])
def test_fp8_linear_dispatch_by_rows(block):
    from meshserve.layers.kernels.fp8_gemm import block_fp8_linear
    from meshserve.layers.kernels.skinny_gemm import skinny_linear

    w8, scale = _weight(1024, 4096, block, seed=2)
    path = "scaled_mm" if block is None else "triton_block"
    gen = torch.Generator(device="cuda").manual_seed(3)
    for m in (1, SKINNY_MAX_M):
        x = torch.randn(m, 4096, device="cuda", generator=gen).bfloat16()
        assert torch.equal(fp8_linear(x, w8, scale, path=path, bias=None, block=block),
                           skinny_linear(x, w8, scale, None, block))
    x = torch.randn(SKINNY_MAX_M + 1, 4096, device="cuda", generator=gen).bfloat16()
    larger = scaled_mm_linear(x, w8, scale, bias=None) if block is None else block_fp8_linear(x, w8, scale, block)
    assert torch.equal(fp8_linear(x, w8, scale, path=path, bias=None, block=block), larger)


@pytest.mark.parametrize("n,k", SHAPES)
def test_bf16_weights_llama_8b_shapes(n, k):
    from meshserve.layers.kernels.skinny_gemm import skinny_linear

    gen = torch.Generator(device="cuda").manual_seed(n + k)
    w = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16()
    bias = torch.randn(n, device="cuda", generator=gen).bfloat16()
    for m in (1, 4, 16):
        x = torch.randn(m, k, device="cuda", generator=gen).bfloat16()
        x[:, :32] *= 20.0
        _check(skinny_linear(x, w, None, bias), x, w.float(), bias)


def _chain(x: torch.Tensor, ws: list[torch.Tensor], norm_w: torch.Tensor, pdl: bool) -> torch.Tensor:
    """A decode layer's kernel order: GEMM, GEMM (split over K) right after it, RMSNorm with a
    residual, GEMM, SiLU·mul, GEMM (split over K)."""
    from meshserve.layers.kernels.activation import silu_and_mul
    from meshserve.layers.kernels.rmsnorm import rmsnorm
    from meshserve.layers.kernels.skinny_gemm import skinny_linear

    qkv, o, gate_up, down = ws
    h = skinny_linear(skinny_linear(x, qkv, pdl=pdl)[:, :4096].contiguous(), o, pdl=pdl)
    h, residual = rmsnorm(h, norm_w, 1e-5, residual=x)
    return skinny_linear(silu_and_mul(skinny_linear(h, gate_up, pdl=pdl)), down, pdl=pdl) + residual


def test_pdl_chain_in_cuda_graph_equals_plain_launches():
    from meshserve.layers.kernels.pdl import pdl_enabled

    gen = torch.Generator(device="cuda").manual_seed(5)
    ws = [(torch.randn(n, k, device="cuda", generator=gen) * 0.02).bfloat16() for n, k in SHAPES]
    norm_w = torch.rand(4096, device="cuda", generator=gen).bfloat16() + 0.5
    x = torch.randn(2, 4096, device="cuda", generator=gen).bfloat16()
    assert pdl_enabled(x) == (torch.cuda.get_device_capability() >= (9, 0))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        _chain(x, ws, norm_w, pdl=True)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(x, ws, norm_w, pdl=True)
    for _ in range(5):
        x.copy_(torch.randn(2, 4096, device="cuda", generator=gen))
        graph.replay()
        assert torch.equal(out, _chain(x, ws, norm_w, pdl=False))


def test_dense_linear_dispatch_by_rows():
    from meshserve.layers.dense import SKINNY_MAX_M, dense_linear
    from meshserve.layers.kernels.skinny_gemm import skinny_linear

    gen = torch.Generator(device="cuda").manual_seed(6)
    w = (torch.randn(1024, 4096, device="cuda", generator=gen) * 0.02).bfloat16()
    sm90 = torch.cuda.get_device_capability() >= (9, 0)
    for m in (1, SKINNY_MAX_M):
        x = torch.randn(m, 4096, device="cuda", generator=gen).bfloat16()
        expected = skinny_linear(x, w, pdl=True) if sm90 else F.linear(x, w)
        assert torch.equal(dense_linear(x, w), expected)
    x = torch.randn(SKINNY_MAX_M + 1, 4096, device="cuda", generator=gen).bfloat16()
    assert torch.equal(dense_linear(x, w), F.linear(x, w))
