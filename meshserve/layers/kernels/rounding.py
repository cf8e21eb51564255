"""Rounding a float32 value to the activation dtype inside a kernel, as eager PyTorch does
between two operations."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """float32 `x` rounded (to nearest, ties to even) to `dtype`'s precision, still float32.

    For bfloat16 this is done on the bits: the compiler folds a plain convert-down-then-up pair
    back into `x` (seen on an H200: 20 % of rotary outputs one unit off the reference), and
    Triton's interpreter converts down by truncation. The bit form survives both."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def to_fp8_e4m3(x, FP8_TY: tl.constexpr):
    """float32 `x` as an FP8 KV pool stores it: clamped to +-448, rounded to nearest (ties to
    even) — the rounding of torch's `.to(torch.float8_e4m3fn)` — then converted to FP8_TY.

    The rounding is done here in float32 (on the bits for normal numbers, by a magic addend for
    subnormals, quantum 2**-9), so the final conversion is exact whatever it does: Triton's
    interpreter rounds some values near powers of two wrongly (1.97 -> 1.0)."""
    x = tl.clamp(x, -448.0, 448.0)
    bits = x.to(tl.uint32, bitcast=True)
    normal = (((bits + 0x7FFFF + ((bits >> 20) & 1)) >> 20) << 20).to(tl.float32, bitcast=True)
    subnormal = (x + 24576.0) - 24576.0  # 24576 = 1.5 * 2**14: float32's quantum there is 2**-9
    return tl.where(tl.abs(x) < 0.015625, subnormal, normal).to(FP8_TY)
