"""Rotary position embedding applied in place to the query and key heads of each token, in one
kernel (the unfused reference takes about fourteen: gathers, casts, rotate_half, products, sums).

The reference computes `x * cos + rotate_half(x) * sin` in the activation dtype with cos/sin
first cast to it; with halves x1, x2 that is
    out1 = round(round(x1 * c) - round(x2 * s)),   out2 = round(round(x2 * c) + round(x1 * s)),
which is what the kernel does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.layers.kernels.rounding import round_to


@triton.jit
def _rotate(X, base, stride_h, n_heads, c, s, BLOCK_H: tl.constexpr, HALF: tl.constexpr,
            BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (offs[None, :] < HALF)
    ptr = X + base + heads[:, None] * stride_h + offs[None, :]
    dtype = X.dtype.element_ty
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    a1 = round_to(x1 * c, dtype)
    b1 = round_to(x2 * s, dtype)
    a2 = round_to(x2 * c, dtype)
    b2 = round_to(x1 * s, dtype)
    tl.store(ptr, round_to(a1 - b1, dtype).to(dtype), mask=mask)
    tl.store(ptr + HALF, round_to(a2 + b2, dtype).to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(Q, K, Cos, Sin, Positions, stride_qt, stride_qh, stride_kt, stride_kh, stride_table,
                   n_q_heads, n_k_heads, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                   BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(Positions + t)
    offs = tl.arange(0, BLOCK_HALF)
    dtype = Q.dtype.element_ty
    # The table holds float32 values for the first half (the second half repeats them).
    c = round_to(tl.load(Cos + pos * stride_table + offs, mask=offs < HALF, other=0.0), dtype)[None, :]
    s = round_to(tl.load(Sin + pos * stride_table + offs, mask=offs < HALF, other=0.0), dtype)[None, :]
    _rotate(Q, t * stride_qt, stride_qh, n_q_heads, c, s, BLOCK_HQ, HALF, BLOCK_HALF)
    _rotate(K, t * stride_kt, stride_kh, n_k_heads, c, s, BLOCK_HK, HALF, BLOCK_HALF)


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                  positions: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place (each head's D values contiguous).
    cos, sin: float32 [max_positions, D] tables; positions: [T]."""
    tokens, n_q, head_dim = q.shape
    n_k = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride() == cos.stride()
    half = head_dim // 2
    if tokens:
        _rotary_kernel[(tokens,)](
            q, k, cos, sin, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), n_q, n_k,
            HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_HQ=triton.next_power_of_2(n_q),
            BLOCK_HK=triton.next_power_of_2(n_k), num_warps=4)
