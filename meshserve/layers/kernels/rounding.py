"""Conversions inside kernels: rounding a float32 value to the activation dtype as eager PyTorch
does between two operations, to FP8 as an FP8 pool stores it, and FP8 e4m3 to bf16 exactly
without the conversion pipe."""

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


# e4m3 -> bf16, four elements per call: byte i of $2 is element i, $0 returns elements 0 and 1 as
# bf16x2 (element 0 in the low half), $1 elements 2 and 3. A byte's sign goes to bit 15 of its
# 16-bit lane and its 7 exponent and mantissa bits to bits 10..4: that is the bf16 whose value is
# the e4m3 value times 2**-120, subnormals included (both formats' subnormals scale alike). One
# exact multiply by 2**120 (bf16 0x7B80; fma adding -0 keeps the sign of zeros) gives the value;
# bf16 fma has no flush-to-zero mode. The e4m3fn NaN pattern becomes 480: FP8 weights hold no NaN,
# nor do FP8 KV pools (to_fp8_e4m3 clamps what it stores to +-448).
_E4M3_TO_BF16_PTX = tl.constexpr("""
{
.reg .b32 t, a, s, two120, nz;
mov.b32 two120, 0x7B807B80;
mov.b32 nz, 0x80008000;
prmt.b32 t, $2, 0, 0x1404;           // t = b1 << 24 | b0 << 8
shr.b32 a, t, 4;                     // a = b1 << 20 | b0 << 4
and.b32 s, t, 0x80008000;            // the two signs at bits 31 and 15
lop3.b32 a, a, 0x07F007F0, s, 0xEA;  // (a & 0x07F007F0) | s
fma.rn.bf16x2 $0, a, two120, nz;
prmt.b32 t, $2, 0, 0x3424;           // t = b3 << 24 | b2 << 8
shr.b32 a, t, 4;
and.b32 s, t, 0x80008000;
lop3.b32 a, a, 0x07F007F0, s, 0xEA;
fma.rn.bf16x2 $1, a, two120, nz;
}
""")


@triton.jit
def e4m3_to_bf16(w):
    """FP8 e4m3 tile -> bf16 with `_E4M3_TO_BF16_PTX` (CUDA only): the FP8 decode GEMMs, the MoE
    expert kernel and the attention kernels' reads of an FP8 KV pool."""
    return tl.inline_asm_elementwise(_E4M3_TO_BF16_PTX, "=r,=r,r", [w.to(tl.uint8, bitcast=True)],
                                     dtype=tl.bfloat16, is_pure=True, pack=4)
