"""Paged decode attention in Triton: one new query token per sequence against the sequence's
K/V, read through the request-to-token table, split over the sequence (flash-decoding). At small
batches the kernel also brings the new token in: it rotates the query and key (rotary
embedding) and stores the key and value in the pool, which saves a kernel per layer where
launches, not bytes, bound the step (see fuses_new_token).

Stage 1: one program per (sequence, KV head, split) computes every query head of that KV head's
group (each K/V block is loaded once for the whole GQA group) over its split of the sequence,
with an online softmax; it writes a partial output and its log-sum-exp. Stage 2 merges the
splits of each (sequence, query head). With one split, stage 1 writes the final output itself.

Why splits: with few sequences, (sequence × KV head) programs cannot fill the GPU, and a long
sequence read by one program runs at a fraction of memory bandwidth. The split count depends
only on the batch size and the GPU, and each sequence's split length is computed on the device
from its own length, so the kernels read no host values per step and can be captured in a CUDA
graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from meshserve.layers.attention.triton_paged import WIDE_HEAD, attend_block, dot_precision, is_fp8, reads_fp8_as_bf16
from meshserve.layers.kernels.device import sm_count
from meshserve.layers.kernels.pdl import launch_dependents, pdl_enabled
from meshserve.layers.kernels.rotary import load_rotated
from meshserve.layers.kernels.rounding import to_fp8_e4m3

MAX_SPLITS = 16
# Keys per block of stage 1. An FP8 pool's key rows are half as many bytes, and 64 of them per
# load left its kernel no faster than bf16's; 128 keys per block made it 15-17 % faster at 32-64
# sequences of 3,000 tokens and 3.5 % at 256 (bench.decode_attention, docs/benchmarks.md), while
# bf16 pools are fastest at 64 (128: 0.6-5 % slower).
BLOCK_N = 64
FP8_BLOCK_N = 128
FUSED_NEW_TOKEN_MAX_BATCH = 2  # see fuses_new_token


@triton.jit
def _decode_stage1(
    Q, K, V, NewK, NewV, Cos, Sin, Positions, Slots, Out, PartialOut, PartialLse, Table, Rows, SeqLens,
    stride_qb, stride_qh, stride_nkb, stride_nkh, stride_nvb, stride_nvh, stride_cos, stride_kt, stride_kh,
    stride_ob, stride_oh, stride_table, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    scale, k_scale, v_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr, NEW_IN_POOL: tl.constexpr,
    KV_FP8: tl.constexpr, FP8_ASM: tl.constexpr, PDL: tl.constexpr,
):
    launch_dependents(PDL)  # with one split the output projection follows: let it start its weight stream
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(SeqLens + b)
    row = tl.load(Rows + b)
    # Splits are whole blocks long; trailing splits of a short sequence are empty.
    split_len = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N
    begin = split * split_len
    end = tl.minimum(begin + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)  # values; the fused path (not NEW_IN_POOL) has V_DIM == HEAD_DIM
    mask_dv = offs_dv < V_DIM
    heads = kv_head * GROUP + offs_g
    dtype = Q.dtype.element_ty  # the model's (K may be an FP8 pool)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_DV], dtype=tl.float32)
    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :]
    q_mask = mask_g[:, None] & mask_d[None, :]
    if KV_FP8:  # keys and values are read as stored: their scales apply to the scores and the output
        scale = scale * k_scale
    if NEW_IN_POOL:
        q = tl.load(q_ptrs, mask=q_mask, other=0.0)
        for start in range(begin, end, BLOCK_N):
            m_i, l_i, acc = attend_block(q, offs_g, m_i, l_i, acc, K, V, Table, row, kv_head, start, end,
                                         stride_table, stride_kt, stride_kh, scale, offs_d, mask_d, offs_dv, mask_dv,
                                         CAUSAL=False, BLOCK_N=BLOCK_N, PRECISION=PRECISION, KV_FP8=KV_FP8,
                                         FP8_ASM=FP8_ASM)
    else:
        # Every program rotates the query heads it needs and the new key of its KV head (a few
        # hundred values). The new key and value come from registers, never from their slot:
        # the loop stops before the new token, which the split holding it folds in last.
        pos = tl.load(Positions + b)
        q = load_rotated(q_ptrs, offs_d[None, :], q_mask, Cos, Sin, pos, stride_cos, HALF=HEAD_DIM // 2).to(dtype)
        new_k = load_rotated(NewK + b * stride_nkb + kv_head * stride_nkh + offs_d, offs_d, mask_d, Cos, Sin, pos,
                             stride_cos, HALF=HEAD_DIM // 2).to(dtype)
        new_v = tl.load(NewV + b * stride_nvb + kv_head * stride_nvh + offs_d, mask=mask_d, other=0.0)
        if KV_FP8:  # attend to the stored values later steps will read from the pool, as they read them
            stored_k = to_fp8_e4m3(new_k.to(tl.float32) / k_scale, K.dtype.element_ty)
            stored_v = to_fp8_e4m3(new_v.to(tl.float32) / v_scale, K.dtype.element_ty)
            new_k, new_v = stored_k.to(tl.float32), stored_v.to(tl.float32)
        else:
            stored_k, stored_v = new_k, new_v
        new_index = seq_len - 1
        cached_end = tl.minimum(end, new_index)
        for start in range(begin, cached_end, BLOCK_N):
            m_i, l_i, acc = attend_block(q, offs_g, m_i, l_i, acc, K, V, Table, row, kv_head, start, cached_end,
                                         stride_table, stride_kt, stride_kh, scale, offs_d, mask_d, offs_dv, mask_dv,
                                         CAUSAL=False, BLOCK_N=BLOCK_N, PRECISION=PRECISION, KV_FP8=KV_FP8,
                                         FP8_ASM=FP8_ASM)
        # The new token: folded into the state of the split that holds it, then stored in its
        # slot for later steps (no program reads that slot in this step).
        holds_new = (begin <= new_index) & (new_index < end)
        s_new = tl.sum(q.to(tl.float32) * new_k.to(tl.float32)[None, :], axis=1) * scale  # [BLOCK_G]
        m_new = tl.maximum(m_i, s_new)
        p_new = tl.exp(s_new - m_new)
        alpha = tl.exp(m_i - m_new)
        m_i = tl.where(holds_new, m_new, m_i)
        l_i = tl.where(holds_new, l_i * alpha + p_new, l_i)
        acc = tl.where(holds_new, acc * alpha[:, None] + p_new[:, None] * new_v.to(tl.float32)[None, :], acc)
        slot = tl.load(Slots + b)
        tl.store(K + slot * stride_kt + kv_head * stride_kh + offs_d, stored_k, mask=mask_d & holds_new)
        tl.store(V + slot * stride_kt + kv_head * stride_kh + offs_d, stored_v, mask=mask_d & holds_new)

    out_mask = mask_g[:, None] & mask_dv[None, :]
    if KV_FP8:
        acc = acc * v_scale
    if SPLITS == 1:
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_dv[None, :],
                 (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=out_mask)
    else:
        # An empty split leaves l_i = 0: its partial output is 0 and its log-sum-exp -inf (weight 0).
        empty = l_i == 0.0
        partial = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(PartialOut + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_dv[None, :],
                 partial, mask=out_mask)
        tl.store(PartialLse + b * stride_lb + heads * stride_lh + split, lse, mask=mask_g)


@triton.jit
def _decode_stage2(
    Out, PartialOut, PartialLse,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    launch_dependents(PDL)  # the output projection follows: let it start its weight stream
    b = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    lse = tl.load(PartialLse + b * stride_lb + head * stride_lh + offs_s)  # [SPLITS]; split 0 is never empty
    weight = tl.exp(lse - tl.max(lse, axis=0))
    partial = tl.load(PartialOut + b * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                      mask=mask_d[None, :], other=0.0)
    out = tl.sum(partial * weight[:, None], axis=0) / tl.sum(weight, axis=0)
    tl.store(Out + b * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=mask_d)


def num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Enough splits for about two programs per multiprocessor (a power of two, at most MAX_SPLITS)."""
    if device.type != "cuda":
        return 1  # Triton's interpreter (tests): they choose splits explicitly
    target = 2 * sm_count(device)
    wanted = triton.cdiv(target, batch * num_kv_heads)
    return min(MAX_SPLITS, triton.next_power_of_2(wanted)) if wanted > 1 else 1


@dataclass(frozen=True)
class NewTokens:
    """A decode step's new token of each sequence as the projections left it: not yet rotated,
    not yet in the pool. Decode attention rotates q and k to `positions`, writes k and v to
    their `slots` (the slots the request-to-token table already lists as each sequence's last),
    and attends to them."""

    k: torch.Tensor  # [B, Hkv, D]
    v: torch.Tensor  # [B, Hkv, D]
    positions: torch.Tensor  # [B]
    slots: torch.Tensor  # [B]
    cos: torch.Tensor  # float32 [max_positions, D], the rotary tables (second half repeats the first)
    sin: torch.Tensor


def fuses_new_token(batch: int) -> bool:
    """Whether decode attention should bring the new tokens in itself (NewTokens) rather than
    find them rotated and stored by the separate kernel. Fusing saves that kernel's launch, which
    is what bounds the smallest batches; but the fused kernel reads K/V more slowly, so from a few
    sequences on the launch it saves is worth less than the time it adds (H200, 8B geometry,
    `python -m meshserve.bench.decode_attention`: per layer, fused vs separate, 7.4 vs 8.2 µs at
    batch 1 and 8.4 vs 9.5 at batch 2 over 300 tokens; 26.1 vs 22.1 at batch 4 over 3,000;
    111 vs 94 at batch 256 over 300)."""
    return batch <= FUSED_NEW_TOKEN_MAX_BATCH


def keys_per_block(query_bytes: int, block_d: int, fp8_pool: bool) -> int:
    """Stage 1's keys per block for queries of `query_bytes` per element and heads padded to
    `block_d`. Shared memory holds the query, a key and a value tile: at MLA's width (1024 padded,
    values 512) 16-bit tiles of 64 keys take ~224 KiB, under the H200's 227; float32 ones would
    take 448 KiB (the compile fails), so float32 wide heads read 16 keys per block (~160 KiB)."""
    if query_bytes > 2 and block_d > WIDE_HEAD:
        return 16
    return FP8_BLOCK_N if fp8_pool and query_bytes <= 2 and block_d <= 128 else BLOCK_N


def decode_attention(q: torch.Tensor, new: NewTokens | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     table: torch.Tensor, rows: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     splits: int | None = None, k_scale: float = 1.0, v_scale: float = 1.0,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, Hq, D]; k_cache: [slots, Hkv, D], v_cache: [slots, Hkv, Dv] with K's strides (Dv < D:
    the latent layout, V a view of K's leading features); table: [rows, max_context] slot ids;
    rows, seq_lens: [B] (seq_lens >= 1, including the new token). With `new`, q is not yet
    rotated and the new tokens are not yet in the pool (see NewTokens); without it, both are
    done (the latent layout always comes without). Returns [B, Hq, Dv]: `out` when given (a view
    with unit last stride, e.g. the decode rows of a mixed step's output), else a new tensor.
    `splits` overrides the automatic choice (a power of two). An FP8 pool is read as
    stored * k_scale / v_scale (and the new token stored so)."""
    batch, num_heads, head_dim = q.shape
    v_dim = v_cache.shape[2]  # < head_dim in the latent layout (MLA): V is K's leading features
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    assert q.stride(-1) == 1 and k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    if new is not None:
        assert new.k.stride(-1) == 1 and new.v.stride(-1) == 1 and new.cos.stride(-1) == 1
        assert new.sin.stride() == new.cos.stride()
    splits = splits or num_splits(batch, num_kv_heads, q.device)
    assert new is None or v_dim == head_dim, "the fused new-token path needs values as wide as keys"
    if out is None:
        out = q.new_empty(batch, num_heads, v_dim)
    assert out.shape == (batch, num_heads, v_dim) and out.stride(-1) == 1
    if batch == 0:
        return out
    block_d, block_dv = triton.next_power_of_2(head_dim), triton.next_power_of_2(v_dim)
    block_n = keys_per_block(q.element_size(), block_d, is_fp8(k_cache.dtype))
    if splits > 1:
        partial = torch.empty((batch, num_heads, splits, v_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
    else:  # stage 1 writes `out` directly; the partial buffers are not touched
        partial, lse = out.unsqueeze(2), out
    # Without new tokens the kernel never touches the NewTokens arguments: q stands in for them.
    nk, nv, cos, sin, positions, slots = (q, q, q, q, seq_lens, seq_lens) if new is None else (
        new.k, new.v, new.cos, new.sin, new.positions, new.slots)
    _decode_stage1[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, nk, nv, cos, sin, positions, slots, out, partial, lse, table, rows, seq_lens,
        q.stride(0), q.stride(1), nk.stride(0), nk.stride(1), nv.stride(0), nv.stride(1), cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        table.stride(0), partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        scale, k_scale, v_scale,
        # tl.dot needs at least 16 rows; unused rows of the group block are masked.
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        V_DIM=v_dim, BLOCK_DV=block_dv,
        BLOCK_N=block_n, SPLITS=splits, PRECISION=dot_precision(q.dtype), NEW_IN_POOL=new is None,
        KV_FP8=is_fp8(k_cache.dtype), FP8_ASM=reads_fp8_as_bf16(q, k_cache.dtype), PDL=pdl_enabled(q),
    )
    if splits > 1:
        _decode_stage2[(batch, num_heads)](
            out, partial, lse, out.stride(0), out.stride(1), partial.stride(0), partial.stride(1), partial.stride(2),
            lse.stride(0), lse.stride(1), HEAD_DIM=v_dim, BLOCK_D=block_dv, SPLITS=splits, PDL=pdl_enabled(q))
    return out
