"""What the paged Triton attention kernels (decode and extend) share."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.layers.kernels.rounding import e4m3_to_bf16


def is_fp8(dtype: torch.dtype) -> bool:
    """An FP8 KV pool (kv_pool.py): the kernels dequantize what they read and quantize what they store."""
    return dtype == torch.float8_e4m3fn


# Padded head widths above this are latent (MLA) heads, whose tiles must shrink to fit in shared
# memory (triton_extend.py, triton_decode.py say how).
WIDE_HEAD = 256


def reads_fp8_as_bf16(q: torch.Tensor, kv_dtype: torch.dtype) -> bool:
    """Whether a kernel reading an FP8 pool for bf16 queries converts with `e4m3_to_bf16` (CUDA
    only): Triton's own conversion spends two conversion-pipe instructions per element (e4m3 ->
    f16, then to bf16 via float32), which bound a decode kernel below the pool's read rate."""
    return is_fp8(kv_dtype) and q.dtype == torch.bfloat16 and q.is_cuda


@triton.jit
def read_fp8(x, dtype: tl.constexpr, FP8_ASM: tl.constexpr):
    """A tile of an FP8 pool as stored, in `dtype`: exact (every e4m3 value is a bf16, fp16 and
    float32 value), unscaled. FP8_ASM (bf16 on CUDA, reads_fp8_as_bf16) converts with bit moves."""
    if FP8_ASM:
        return e4m3_to_bf16(x)
    return x.to(tl.float32).to(dtype)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 models get true float32 products (Triton's default for float32 dots is tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def attend_block(q, q_pos, m_i, l_i, acc, K, V, Table, row, kv_head, start, end,
                 stride_table, stride_kt, stride_kh, scale, offs_d, mask_d, offs_dv, mask_dv,
                 CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, KV_FP8: tl.constexpr,
                 FP8_ASM: tl.constexpr = False, FULL: tl.constexpr = False, EXP2: tl.constexpr = False):
    """Fold keys [start, start + BLOCK_N) ∩ [0, end) of sequence `row` (slots read through the
    request-to-token table) into the online-softmax state (m_i, l_i, acc) of the query rows `q`.
    With CAUSAL, key j is visible to query row i only when j <= q_pos[i]. With FULL the caller
    guarantees that the whole block lies below `end` and is visible to every query row, and no
    key is masked. With EXP2, `scale` includes log2(e) and the state's maxima are in base 2 (one
    multiply less per exponential). Keys span offs_d, values offs_dv (narrower for latent
    attention, where V and K share their leading features and their strides). Returns the new
    state.

    With KV_FP8 the pool holds FP8 and the block is read as stored (read_fp8), unscaled: the
    caller folds the layer's k_scale into `scale` and multiplies its output by v_scale, which
    equals reading stored * scale (exactly so for power-of-two scales, else closer to it than a
    16-bit product) and keeps the per-element work to the conversion."""
    offs_n = start + tl.arange(0, BLOCK_N)
    if FULL:  # only the head's padding (if any) is masked
        slots = tl.load(Table + row * stride_table + offs_n)
        k_mask = mask_d[None, :]
        v_mask = mask_dv[None, :]
    else:
        mask_n = offs_n < end
        slots = tl.load(Table + row * stride_table + offs_n, mask=mask_n, other=0)
        k_mask = mask_n[:, None] & mask_d[None, :]
        v_mask = mask_n[:, None] & mask_dv[None, :]
    k = tl.load(K + slots[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=k_mask, other=0.0)
    if KV_FP8:
        k = read_fp8(k, q.dtype, FP8_ASM)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [rows, BLOCK_N]
    if not FULL:
        visible = mask_n[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if EXP2:
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
    else:
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(V + slots[:, None] * stride_kt + kv_head * stride_kh + offs_dv[None, :], mask=v_mask, other=0.0)
    if KV_FP8:
        v = read_fp8(v, q.dtype, FP8_ASM)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
    return m_new, l_i, acc
