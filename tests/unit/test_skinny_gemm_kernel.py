"""The skinny GEMM (kernels/skinny_gemm.py) against the product of the unquantized activations and
the dequantized weight, in Triton's interpreter on the CPU (compiled on CUDA machines): FP8
weights with per-row and 128 x 128 block scales, and weights in the activations' dtype; rows 1
to 70 (one to two row tiles, padded rows), ragged N and K, K split in uneven slices, a bias.

Activations are float32 and float16 here: the interpreter gets bfloat16 dots wrong (it multiplies
the bit patterns), so bfloat16 is covered on CUDA (the exactness test below, compiled, and
tests/gpu/test_skinny_gemm.py), where its weights are converted by the kernel's PTX; the
bit moves of that PTX are replayed here on every byte. Bound: the output's rounding (2**-10
relative for float16, float32's own for float32) plus float32 summation-order error, 2**-20 of
the sum of the absolute products."""

from __future__ import annotations

import os

import pytest
import torch

from meshserve.layers.fp8 import dequantize, quantize_blockwise, quantize_per_channel

pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py without CUDA)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_OUTPUT_ROUNDING = {torch.float32: 2**-20, torch.float16: 2**-10}


def _check(out: torch.Tensor, x: torch.Tensor, w_real: torch.Tensor, bias: torch.Tensor | None) -> None:
    expected = x.float() @ w_real.T + (0 if bias is None else bias.float())
    bound = _OUTPUT_ROUNDING[x.dtype] * expected.abs() + 2**-20 * (x.float().abs() @ w_real.abs().T)
    assert out.dtype == x.dtype and out.shape == expected.shape
    err = (out.float() - expected).abs()
    assert (err <= bound).all(), f"{(err > bound).sum().item()} of {err.numel()} outside, worst {err.max().item()}"


@pytest.mark.parametrize("m,dtype,sms", [(1, torch.float16, 1), (5, torch.float32, 64), (16, torch.float16, 64),
                                         (70, torch.float32, 64)])
def test_per_row_scales(m, dtype, sms):
    from meshserve.layers.kernels.skinny_gemm import skinny_linear, skinny_tiles

    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 640, generator=gen).to(dtype).to(DEVICE)
    x[:, :64] *= 30.0  # a few large activations, as real models have
    w8, scale = quantize_per_channel(torch.randn(200, 640, generator=gen).to(DEVICE) * 0.02)
    bias = torch.randn(200, generator=gen).to(dtype).to(DEVICE)
    tiles = skinny_tiles(m, 200, 640, sms)  # 1 SM: one K slice; 64 SMs: the last slice is shorter
    if m <= 32:  # K steps of 256: 3, in slices of 2 and 1
        assert (tiles.block_k, tiles.split_k, tiles.k_per_split) == ((256, 1, 768) if sms == 1 else (256, 2, 512))
    else:  # 64-row tiles, K steps of 128: 5, in slices of 2, 2 and 1
        assert (tiles.block_k, tiles.split_k, tiles.k_per_split) == ((128, 1, 640) if sms == 1 else (128, 3, 256))
    out = skinny_linear(x, w8, scale, bias, tiles=tiles)
    _check(out, x, dequantize(w8, scale), bias)


@pytest.mark.parametrize("m,dtype,sms", [(1, torch.float32, 1), (1, torch.float16, 64), (8, torch.float32, 64),
                                         (16, torch.float16, 1)])
def test_weight_in_activation_dtype(m, dtype, sms):
    """A bf16-model layer's path (here float32 and float16, see above): no scales, K steps of 256
    bytes (64 float32 or 128 float16 columns), a ragged last step (K = 600), uneven slices."""
    from meshserve.layers.kernels.skinny_gemm import skinny_linear, skinny_tiles

    gen = torch.Generator().manual_seed(100 + m)
    x = torch.randn(m, 600, generator=gen).to(dtype).to(DEVICE)
    w = (torch.randn(136, 600, generator=gen) * 0.05).to(dtype).to(DEVICE)
    bias = torch.randn(136, generator=gen).to(dtype).to(DEVICE)
    tiles = skinny_tiles(m, 136, 600, sms, weight_bytes=w.element_size())
    steps = -(-600 // tiles.block_k)
    assert tiles.block_k * w.element_size() == 256 and steps == (10 if dtype == torch.float32 else 5)
    assert tiles.split_k == (1 if sms == 1 else (5 if dtype == torch.float32 else 3))
    _check(skinny_linear(x, w, None, bias, tiles=tiles), x, w.float(), bias)
    _check(skinny_linear(x, w), x, w.float(), None)  # the launcher's own tiles


@pytest.mark.parametrize("m,sms", [(3, 1), (16, 64)])
def test_block_scales(m, sms):
    from meshserve.layers.kernels.skinny_gemm import skinny_linear, skinny_tiles

    gen = torch.Generator().manual_seed(m)
    x = torch.randn(2, m, 384, generator=gen).to(DEVICE)  # leading dims are flattened and restored
    w = torch.randn(200, 384, generator=gen)
    w[:, 128:256] *= 40.0  # blocks of very different range get their own scales
    w8, scale = quantize_blockwise(w.to(DEVICE), (128, 128))
    tiles = skinny_tiles(2 * m, 200, 384, sms, block_k_divides=128)
    assert tiles.block_k == 128 and tiles.split_k == (1 if sms == 1 else 2)
    out = skinny_linear(x, w8, scale, None, block=(128, 128), tiles=tiles)
    assert out.shape == (2, m, 200)
    _check(out.reshape(2 * m, 200), x.reshape(2 * m, 384), dequantize(w8, scale, (128, 128)), None)


@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_tiles_cover_an_h200_at_llama_8b_shapes(n, k):
    """On 132 SMs every decode GEMM of Llama-3.1-8B gets at least 2 programs per SM (or the most
    slices allowed), each K slice non-empty and whole K steps, and the slices cover K."""
    from meshserve.layers.kernels.skinny_gemm import MAX_SPLIT_K, PROGRAMS_PER_SM, skinny_tiles

    for m in (1, 8, 16):
        t = skinny_tiles(m, n, k, 132)
        programs = -(-n // t.block_n) * -(-m // t.block_m) * t.split_k
        assert programs >= PROGRAMS_PER_SM * 132 or t.split_k * 2 > min(MAX_SPLIT_K, -(-k // t.block_k)), t
        assert t.k_per_split % t.block_k == 0 and (t.split_k - 1) * t.k_per_split < k <= t.split_k * t.k_per_split


def test_weight_that_is_not_rows_of_k_bytes_is_refused():
    from meshserve.layers.kernels.skinny_gemm import skinny_linear

    w8, scale = quantize_per_channel(torch.randn(64, 32))
    with pytest.raises(ValueError, match="input width 48"):
        skinny_linear(torch.randn(1, 48), w8, scale)
    with pytest.raises(ValueError, match="strides"):
        skinny_linear(torch.randn(1, 64), w8.t(), scale)
    with pytest.raises(ValueError, match="without scales"):
        skinny_linear(torch.randn(1, 32), w8)
    with pytest.raises(ValueError, match="with scales"):
        skinny_linear(torch.randn(1, 32), torch.randn(64, 32), scale)


def test_block_width_without_a_k_step_is_refused():
    from meshserve.layers.kernels.skinny_gemm import skinny_tiles

    assert skinny_tiles(1, 256, 384, 132, block_k_divides=96).block_k == 32
    with pytest.raises(ValueError, match="block width 72"):
        skinny_tiles(1, 256, 360, 132, block_k_divides=72)


def _every_e4m3(n_rows: int, k: int) -> torch.Tensor:
    """[n_rows, k] FP8 whose row r starts at byte r and counts up (mod 256), NaN bytes zeroed: the
    first 16 columns of 256 rows hold every finite e4m3 value, subnormals and -0 included."""
    codes = (torch.arange(n_rows)[:, None] + torch.arange(k)[None, :]) % 256
    codes[(codes & 0x7F) == 0x7F] = 0
    return codes.to(torch.uint8).view(torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else []))
def test_every_fp8_value_passes_exactly(dtype):
    """One-hot activations pick single weights: the output is each FP8 value times its row's
    scale (a power of two, so exact in every dtype), bit for bit."""
    from meshserve.layers.kernels.skinny_gemm import skinny_linear

    w8 = _every_e4m3(256, 64).to(DEVICE)
    scale = (2.0 ** torch.randint(-3, 4, (256, 1), generator=torch.Generator().manual_seed(0))).to(DEVICE)
    x = torch.eye(16, 64, dtype=dtype, device=DEVICE)
    out = skinny_linear(x, w8, scale)
    assert torch.equal(out, (w8[:, :16].float() * scale).T.to(dtype))


def test_bf16_conversion_bit_moves():
    """The integer steps of kernels/skinny_gemm._E4M3_TO_BF16_PTX (prmt, shr, and, lop3 0xEA,
    then times 2**120) replayed on 32-bit words of four e4m3 bytes give torch's bf16 of each."""
    codes = torch.arange(256, dtype=torch.int64)
    codes = codes[(codes & 0x7F) != 0x7F]
    codes = torch.cat([codes, codes[:2]])  # all 254 finite codes and two again: 64 words
    codes = codes[torch.randperm(len(codes), generator=torch.Generator().manual_seed(0))].view(-1, 4)
    word = codes[:, 0] | codes[:, 1] << 8 | codes[:, 2] << 16 | codes[:, 3] << 24
    lanes = []
    for lo, hi in ((0, 1), (2, 3)):  # prmt 0x1404 and 0x3424: bytes lo, hi to the top of each half
        t = ((word >> 8 * lo) & 0xFF) << 8 | ((word >> 8 * hi) & 0xFF) << 24
        a = ((t >> 4) & 0x07F007F0) | (t & 0x80008000)
        lanes += [a & 0xFFFF, a >> 16]
    bits = torch.stack(lanes, dim=1).to(torch.int16)  # int64 -> int16 keeps the low 16 bits
    converted = bits.view(torch.bfloat16).float() * 2.0**120
    expected = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    assert torch.equal(converted, expected)
