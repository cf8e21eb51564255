"""The new tokens' way into the KV cache, in one kernel per layer: rotary position embedding
applied in place to the query and key heads, and the rotated keys and the values written to
their slots of the paged KV pool. Unfused, that is about fourteen kernels for the rotation
(gathers, casts, rotate_half, products, sums) and two index_put kernels for the store. Decode
steps skip even that kernel: decode attention rotates and stores its one new token per sequence
itself, with `load_rotated` (attention/triton_decode.py).

The reference computes `x * cos + rotate_half(x) * sin` in the activation dtype with cos/sin
first cast to it; with halves x1, x2 that is
    out1 = round(round(x1 * c) - round(x2 * s)),   out2 = round(round(x2 * c) + round(x1 * s)),
which is what the kernel does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.layers.kernels.rounding import round_to, to_fp8_e4m3


@triton.jit
def _rotation(x, partner, c, signed_s, dtype: tl.constexpr):
    """round(round(x * c) + round(partner * signed_s)): one output element of the rotation, with
    partner the other half's element and signed_s = -sin for the first half, +sin for the second
    (rounding is symmetric, so this is the reference's subtraction there)."""
    return round_to(round_to(x * c, dtype) + round_to(partner * signed_s, dtype), dtype)


@triton.jit
def _rotate(ptr, mask, c, s, HALF: tl.constexpr):
    """Rotate the [heads, HALF] halves at ptr and ptr + HALF in place; return the new halves."""
    dtype = ptr.dtype.element_ty
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    o1 = _rotation(x1, x2, c, -s, dtype).to(dtype)
    o2 = _rotation(x2, x1, c, s, dtype).to(dtype)
    tl.store(ptr, o1, mask=mask)
    tl.store(ptr + HALF, o2, mask=mask)
    return o1, o2


@triton.jit
def load_rotated(ptr, offs_d, mask, Cos, Sin, pos, stride_table, HALF: tl.constexpr):
    """Head vectors at `ptr` (whole heads: offs_d, of any block width, runs along the last axis)
    rotated to position `pos`, as float32 values already rounded to the activation dtype. For
    kernels that use rotated heads without writing them back (decode attention)."""
    dtype = ptr.dtype.element_ty
    lower = offs_d < HALF
    x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    partner = tl.load(ptr + tl.where(lower, HALF, -HALF), mask=mask, other=0.0).to(tl.float32)
    in_head = offs_d < 2 * HALF
    c = round_to(tl.load(Cos + pos * stride_table + offs_d, mask=in_head, other=0.0), dtype)
    s = round_to(tl.load(Sin + pos * stride_table + offs_d, mask=in_head, other=0.0), dtype)
    return _rotation(x, partner, c, tl.where(lower, -s, s), dtype)


@triton.jit
def _rotate_and_store_kernel(Q, K, V, Cos, Sin, Positions, KCache, VCache, Slots, stride_qt, stride_qh, stride_kt,
                             stride_kh, stride_vt, stride_vh, stride_cs, stride_ch, stride_table, n_q_heads,
                             n_k_heads, k_scale, v_scale, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                             BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, KV_FP8: tl.constexpr):
    t = tl.program_id(0)
    pos = tl.load(Positions + t)
    slot = tl.load(Slots + t)
    offs = tl.arange(0, BLOCK_HALF)[None, :]
    dtype = Q.dtype.element_ty
    # The table holds float32 values for the first half (the second half repeats them).
    c = round_to(tl.load(Cos + pos * stride_table + offs, mask=offs < HALF, other=0.0), dtype)
    s = round_to(tl.load(Sin + pos * stride_table + offs, mask=offs < HALF, other=0.0), dtype)

    q_heads = tl.arange(0, BLOCK_HQ)[:, None]
    _rotate(Q + t * stride_qt + q_heads * stride_qh + offs, (q_heads < n_q_heads) & (offs < HALF), c, s, HALF)

    k_heads = tl.arange(0, BLOCK_HK)[:, None]
    k_mask = (k_heads < n_k_heads) & (offs < HALF)
    k1, k2 = _rotate(K + t * stride_kt + k_heads * stride_kh + offs, k_mask, c, s, HALF)
    dst = slot * stride_cs + k_heads * stride_ch + offs
    v = V + t * stride_vt + k_heads * stride_vh + offs
    v1, v2 = tl.load(v, mask=k_mask), tl.load(v + HALF, mask=k_mask)
    if KV_FP8:  # the pool's rounding (kv_pool.quantize_kv)
        cache_ty = KCache.dtype.element_ty
        k1, k2 = to_fp8_e4m3(k1.to(tl.float32) / k_scale, cache_ty), to_fp8_e4m3(k2.to(tl.float32) / k_scale, cache_ty)
        v1, v2 = to_fp8_e4m3(v1.to(tl.float32) / v_scale, cache_ty), to_fp8_e4m3(v2.to(tl.float32) / v_scale, cache_ty)
    tl.store(KCache + dst, k1, mask=k_mask)
    tl.store(KCache + dst + HALF, k2, mask=k_mask)
    tl.store(VCache + dst, v1, mask=k_mask)
    tl.store(VCache + dst + HALF, v2, mask=k_mask)


def rotate_and_store_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slots: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place, then k_cache[slots[t]] = k[t] and
    v_cache[slots[t]] = v[t] (v [T, Hk, D]; caches [S, Hk, D] with equal strides; each head's D
    values contiguous everywhere). cos, sin: float32 [max_positions, D] tables; positions and
    slots: [T]. An FP8 cache stores k / k_scale and v / v_scale, rounded (kv_pool.py)."""
    tokens, n_q, head_dim = q.shape
    n_k = k.shape[1]
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and cos.stride(-1) == 1
    assert sin.stride() == cos.stride() and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    half = head_dim // 2
    if tokens:
        _rotate_and_store_kernel[(tokens,)](
            q, k, v, cos, sin, positions, k_cache, v_cache, slots, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), cos.stride(0), n_q, n_k, k_scale, v_scale,
            KV_FP8=k_cache.dtype == torch.float8_e4m3fn, HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_HQ=triton.next_power_of_2(n_q),
            BLOCK_HK=triton.next_power_of_2(n_k), num_warps=4)
