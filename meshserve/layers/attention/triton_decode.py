"""Paged decode attention as one Triton kernel: one new query token per sequence against the
sequence's K/V, read through the request-to-token table.

One program per (sequence, KV head) computes every query head of that KV head's group, so each
K/V block is loaded once for the whole group (GQA), with an online softmax over blocks of
tokens. Shapes and the loop bound come from device tensors only (no host values per step), so
the kernel can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_kernel(
    Q, K, V, Out, Table, Rows, SeqLens,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_ob, stride_oh, stride_table,
    scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(SeqLens + b)  # a scalar
    row = tl.load(Rows + b)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(0, seq_len, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        mask_n = offs_n < seq_len
        slots = tl.load(Table + row * stride_table + offs_n, mask=mask_n, other=0)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=mask_g[:, None] & mask_d[None, :])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                     rows: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q: [B, Hq, D]; k_cache/v_cache: [slots, Hkv, D]; table: [rows, max_context] slot ids;
    rows, seq_lens: [B] (seq_lens >= 1, including the new token). Returns [B, Hq, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    # tl.dot needs at least 16 rows; unused rows of the group block are masked.
    block_g = max(16, triton.next_power_of_2(group))
    _decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, out, table, rows, seq_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        table.stride(0), scale,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=block_g, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=64,
        # float32 models get true float32 products (Triton's default for them is tf32).
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out
