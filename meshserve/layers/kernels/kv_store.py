"""Writing a step's new keys and values into the paged KV pool: one kernel for both (two
PyTorch index_put kernels otherwise), reading k and v straight from their views of the QKV
projection."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(K, V, KCache, VCache, Slots, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cs, stride_ch, n_heads, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(Slots + t)
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (dims < HEAD_DIM)
    dst = slot * stride_cs + heads * stride_ch + dims
    tl.store(KCache + dst, tl.load(K + t * stride_kt + heads * stride_kh + dims, mask=mask), mask=mask)
    tl.store(VCache + dst, tl.load(V + t * stride_vt + heads * stride_vh + dims, mask=mask), mask=mask)


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
             v: torch.Tensor) -> None:
    """k_cache[slots[i]] = k[i] and v_cache[slots[i]] = v[i]; caches [S, H, D] (same strides),
    k, v [T, H, D] with each head's D values contiguous, slots [T] int64."""
    tokens, heads, head_dim = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    if tokens:
        _store_kv_kernel[(tokens,)](
            k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            k_cache.stride(0), k_cache.stride(1), heads, HEAD_DIM=head_dim,
            BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
