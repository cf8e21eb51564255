"""Paged extend (prefill) attention in Triton: the new tokens of every sequence of a batch attend,
causally, to their sequence's cached prefix and to each other, in one launch.

One program per (block of BLOCK_M new tokens, sequence, query head). Keys and values are read
from the pool through the request-to-token table — the new tokens' K/V are already there — so a
cached prefix (radix hit, later chunk of a chunked prefill) and a fresh prompt take the same
path. Online softmax over key blocks (FlashAttention-2), in base 2. A block of queries reads the
keys every one of its rows sees without any mask (the prefix and the new tokens before its first
row), then the few blocks across its diagonal with the causal mask, and stops at its last row's
last key, so the causal half of the new-token square is never read. Blocks run from the last
(the most keys) to the first, so the longest programs start first and the grid's tail is short.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from meshserve.layers.attention.triton_paged import WIDE_HEAD, attend_block, dot_precision, is_fp8, reads_fp8_as_bf16
from meshserve.layers.kernels.device import max_shared_bytes

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class ExtendTiles:
    """One launch's tiling: BLOCK_M query rows by BLOCK_N keys, its warps and pipeline stages."""

    block_m: int
    block_n: int
    warps: int
    stages: int


# 16-bit heads of at most 128 features: 128 x 128 tiles with 8 warps and three stages, the fastest
# of the tilings timed on the H200 (bench.extend_attention: 310 TFLOP/s for a 4,096-token prompt
# against 281 with 128 x 64 and 197 with 64 x 64, 4 warps, 2 stages). Shared memory: Q 32 KiB +
# 3 x (K 32 + V 32) KiB = 224 KiB of the 227 an H100 or H200 has.
WIDE_TILES = ExtendTiles(128, 128, 8, 3)
# Wider 16-bit heads (256) and float32 heads of at most 128 features.
NARROW_TILES = ExtendTiles(64, 64, 4, 2)
# Heads wider than WIDE_HEAD (MLA's 576-wide latent keys, padded to 1024) take smaller tiles and one
# pipeline stage: a 64 x 1024 bf16 tile is 128 KiB, and 64/64 tiles with two stages need 512 KiB
# of shared memory (an H200 has 227 KiB). 32/32 with one stage: Q 64 + K 64 + V 32 KiB.
# Heads whose width is not a power of two (padded, masked) take the same tiles: with 64/64 tiles
# the compiled kernel returns wrong values for 16-bit inputs at such widths (measured on the H200,
# Triton 3.6: a 40-wide latent head in bf16 and fp16 off by up to 3.6, with one stage too; 32/32
# tiles are exact, and so is every width in float32). The interpreter cannot show it. float32
# inputs take 16/16 there: 32/32 float32 tiles of a 1024-wide head need 256 KiB.
PADDED_TILES = ExtendTiles(32, 32, 4, 1)
PADDED_F32_TILES = ExtendTiles(16, 16, 4, 1)


def shared_bytes(tiles: ExtendTiles, head_dim: int, element_size: int) -> int:
    """Shared memory one program of `tiles` takes: the query tile and `stages` key and value tiles."""
    return element_size * head_dim * (tiles.block_m + 2 * tiles.block_n * tiles.stages)


def extend_tiles(head_dim: int, element_size: int, max_shared: int | None = None) -> ExtendTiles:
    """The tiles for heads `head_dim` wide (queries and keys) of `element_size`-byte elements, on a
    device whose programs may take `max_shared` bytes of shared memory (None: any). WIDE_TILES
    needs an H100's or H200's; an A100 (163 KiB) or a consumer GPU (99 KiB) takes NARROW_TILES."""
    block_d = triton.next_power_of_2(head_dim)
    if block_d > WIDE_HEAD or block_d != head_dim:
        return PADDED_TILES if element_size <= 2 else PADDED_F32_TILES
    wide = element_size <= 2 and head_dim <= 128
    fits = max_shared is None or shared_bytes(WIDE_TILES, head_dim, element_size) <= max_shared
    return WIDE_TILES if wide and fits else NARROW_TILES


@triton.jit
def _extend_kernel(
    Q, K, V, Out, Table, Rows, SeqLens, ExtendLens, QStarts,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ot, stride_oh, stride_table,
    qk_scale, k_scale, v_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
    FP8_ASM: tl.constexpr,
):
    m_block = tl.num_programs(0) - 1 - tl.program_id(0)  # the last blocks see the most keys: first
    b = tl.program_id(1)
    head = tl.program_id(2)
    extend_len = tl.load(ExtendLens + b)
    # The grid is sized for the longest sequence of the batch; a block past this one's new tokens
    # has nothing to do.
    if m_block * BLOCK_M >= extend_len:
        return
    kv_head = head // GROUP
    seq_len = tl.load(SeqLens + b)
    row = tl.load(Rows + b)
    q_start = tl.load(QStarts + b)
    prefix = seq_len - extend_len

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # index among this sequence's new tokens
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < extend_len
    mask_d = offs_d < HEAD_DIM
    offs_dv = tl.arange(0, BLOCK_DV)
    mask_dv = offs_dv < V_DIM
    q = tl.load(Q + (q_start + offs_m)[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    q_pos = prefix + offs_m  # absolute positions; query i sees keys 0..q_pos[i]
    if KV_FP8:  # keys and values are read as stored: their scales apply to the scores and the output
        qk_scale = qk_scale * k_scale

    # Keys 0..prefix + m_block * BLOCK_M are visible to every row of the block (padding rows see
    # more), and all lie below seq_len: whole blocks of them need no mask. The rest, up to the last
    # row's own key, crosses the diagonal.
    full_end = (prefix + m_block * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    end = tl.minimum(seq_len, prefix + (m_block + 1) * BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start in range(0, full_end, BLOCK_N):
        m_i, l_i, acc = attend_block(q, q_pos, m_i, l_i, acc, K, V, Table, row, kv_head, start, end, stride_table,
                                     stride_kt, stride_kh, qk_scale, offs_d, mask_d, offs_dv, mask_dv,
                                     CAUSAL=True, BLOCK_N=BLOCK_N, PRECISION=PRECISION, KV_FP8=KV_FP8,
                                     FP8_ASM=FP8_ASM, FULL=True, EXP2=True)
    # Key 0 is visible to every query row, so after the first block each row's running maximum is
    # finite and no -inf - -inf can appear.
    for start in range(full_end, end, BLOCK_N):
        m_i, l_i, acc = attend_block(q, q_pos, m_i, l_i, acc, K, V, Table, row, kv_head, start, end, stride_table,
                                     stride_kt, stride_kh, qk_scale, offs_d, mask_d, offs_dv, mask_dv,
                                     CAUSAL=True, BLOCK_N=BLOCK_N, PRECISION=PRECISION, KV_FP8=KV_FP8,
                                     FP8_ASM=FP8_ASM, FULL=False, EXP2=True)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    if KV_FP8:
        out = out * v_scale
    tl.store(Out + (q_start + offs_m)[:, None] * stride_ot + head * stride_oh + offs_dv[None, :],
             out.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_dv[None, :])


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                     rows: torch.Tensor, seq_lens: torch.Tensor, extend_lens: torch.Tensor, q_starts: torch.Tensor,
                     max_extend_len: int, scale: float, k_scale: float = 1.0, v_scale: float = 1.0,
                     out: torch.Tensor | None = None, tiles: ExtendTiles | None = None) -> torch.Tensor:
    """q: [T, Hq, D], the new tokens of every sequence, sequence after sequence; k_cache/v_cache:
    [slots, Hkv, D] holding every sequence's prefix and new tokens (v_cache [slots, Hkv, Dv] with K's
    strides, Dv < D in the latent layout); table: [rows, max_context];
    rows, seq_lens (prefix + new), extend_lens, q_starts (offset of each sequence's first new
    token in q): [B] device tensors; max_extend_len: the largest extend length (host). An FP8
    pool is read as stored * k_scale / v_scale. `tiles` overrides extend_tiles' choice (benchmarks).
    Returns [T, Hq, Dv]: `out` when given (a view with unit last stride, e.g. the prompt rows of a
    mixed step's output), else a new tensor."""
    tokens, num_heads, head_dim = q.shape
    v_dim = v_cache.shape[2]  # < head_dim in the latent layout (MLA): V is K's leading features
    if out is None:
        out = q.new_empty(tokens, num_heads, v_dim)
    assert out.shape == (tokens, num_heads, v_dim) and out.stride(-1) == 1
    if tokens == 0:
        return out
    tiles = tiles or extend_tiles(head_dim, q.element_size(), max_shared_bytes(q.device))
    grid = (triton.cdiv(max_extend_len, tiles.block_m), rows.shape[0], num_heads)
    _extend_kernel[grid](
        q, k_cache, v_cache, out, table, rows, seq_lens, extend_lens, q_starts,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        table.stride(0), scale * LOG2E, k_scale, v_scale,
        GROUP=num_heads // k_cache.shape[1], HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        V_DIM=v_dim, BLOCK_DV=triton.next_power_of_2(v_dim), BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        PRECISION=dot_precision(q.dtype), KV_FP8=is_fp8(k_cache.dtype),
        FP8_ASM=reads_fp8_as_bf16(q, k_cache.dtype), num_warps=tiles.warps,
        num_stages=tiles.stages,
    )
    return out
