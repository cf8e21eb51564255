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
