"""Paged decode attention in Triton: one new query token per sequence against the sequence's
K/V, read through the request-to-token table, split over the sequence (flash-decoding), in one
kernel launch.

One program per (sequence, KV head, split) computes every query head of that KV head's group
(each K/V block is loaded once for the whole GQA group) over its split of the sequence, with an
online softmax, and writes a partial output and its log-sum-exp. The program of a (sequence, KV
head) that finishes last — it counts arrivals with an atomic — merges the splits and writes the
output, so no second kernel is launched (at batch 1 that launch was ~1.7 us per layer on an
H200, 6 % of the non-GEMM time of an 8B decode step). With one split, the program writes the
output directly.

Why splits: with few sequences, (sequence × KV head) programs cannot fill the GPU, and a long
sequence read by one program runs at a fraction of memory bandwidth. The split count depends
only on the batch size and the GPU, and each sequence's split length is computed on the device
from its own length, so the kernel reads no host values per step and can be captured in a CUDA
graph.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from meshserve.layers.attention.triton_paged import attend_block, dot_precision

MAX_SPLITS = 16
BLOCK_N = 64


@triton.jit
def _decode_kernel(
    Q, K, V, Out, PartialOut, PartialLse, Arrivals, Table, Rows, SeqLens,
    stride_qb, stride_qh, stride_kt, stride_kh, stride_ob, stride_oh, stride_table,
    stride_pb, stride_ph, stride_ps, stride_lb, stride_lh,
    scale, n_kv_heads,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
):
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
    heads = kv_head * GROUP + offs_g
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(begin, end, BLOCK_N):
        m_i, l_i, acc = attend_block(q, offs_g, m_i, l_i, acc, K, V, Table, row, kv_head, start, end, stride_table,
                                     stride_kt, stride_kh, scale, offs_d, mask_d, CAUSAL=False, BLOCK_N=BLOCK_N,
                                     PRECISION=PRECISION)

    out_mask = mask_g[:, None] & mask_d[None, :]
    if SPLITS == 1:
        tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 (acc / l_i[:, None]).to(Out.dtype.element_ty), mask=out_mask)
    else:
        # An empty split leaves l_i = 0: its partial output is 0 and its log-sum-exp -inf (weight 0).
        empty = l_i == 0.0
        partial = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(PartialOut + b * stride_pb + heads[:, None] * stride_ph + split * stride_ps + offs_d[None, :],
                 partial, mask=out_mask)
        tl.store(PartialLse + b * stride_lb + heads * stride_lh + split, lse, mask=mask_g)
        # Every thread's stores precede the (single-thread) release below; the program that
        # arrives last acquires them all, merges, and resets the counter for the next launch.
        tl.debug_barrier()
        counter = Arrivals + b * n_kv_heads + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLITS - 1:
            _merge_splits(Out, PartialOut, PartialLse, b, heads, mask_g, offs_d, out_mask, stride_ob, stride_oh,
                          stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, SPLITS)
            tl.atomic_xchg(counter, 0)


@triton.jit
def _merge_splits(Out, PartialOut, PartialLse, b, heads, mask_g, offs_d, out_mask, stride_ob, stride_oh,
                  stride_pb, stride_ph, stride_ps, stride_lb, stride_lh, SPLITS: tl.constexpr):
    """out = sum_s w_s * partial_s / sum_s w_s, w_s = exp(lse_s - max lse) (split 0 is never
    empty, so the maximum is finite). Loads bypass L1: the partials were written by other SMs."""
    lse_base = PartialLse + b * stride_lb + heads * stride_lh
    top = tl.load(lse_base, mask=mask_g, other=0.0, cache_modifier=".cg")
    for s in tl.static_range(1, SPLITS):
        top = tl.maximum(top, tl.load(lse_base + s, mask=mask_g, other=0.0, cache_modifier=".cg"))
    total = tl.zeros_like(top)
    acc = tl.zeros(out_mask.shape, dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        weight = tl.exp(tl.load(lse_base + s, mask=mask_g, other=0.0, cache_modifier=".cg") - top)
        partial = tl.load(PartialOut + b * stride_pb + heads[:, None] * stride_ph + s * stride_ps + offs_d[None, :],
                          mask=out_mask, other=0.0, cache_modifier=".cg")
        acc += partial * weight[:, None]
        total += weight
    tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             (acc / total[:, None]).to(Out.dtype.element_ty), mask=out_mask)


@functools.cache
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Enough splits for about two programs per multiprocessor (a power of two, at most MAX_SPLITS)."""
    if device.type != "cuda":
        return 1  # Triton's interpreter (tests): they choose splits explicitly
    target = 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())
    wanted = triton.cdiv(target, batch * num_kv_heads)
    return min(MAX_SPLITS, triton.next_power_of_2(wanted)) if wanted > 1 else 1


_MAX_COUNTERS = 4096  # (sequence, KV head) pairs of one split launch; automatic splits stay below 2 per SM


@functools.cache
def _arrivals(device: torch.device) -> torch.Tensor:
    """The per-(sequence, KV head) arrival counters of a device, zero between launches (the
    merging program resets its own). Allocated once, outside any CUDA-graph capture, so every
    graph and eager launch sees the same zeroed memory."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    assert not capturing, "first decode_attention call inside a graph capture"
    return torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
                     rows: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     splits: int | None = None) -> torch.Tensor:
    """q: [B, Hq, D]; k_cache/v_cache: [slots, Hkv, D]; table: [rows, max_context] slot ids;
    rows, seq_lens: [B] (seq_lens >= 1, including the new token). Returns [B, Hq, D].
    `splits` overrides the automatic choice (a power of two)."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    splits = splits or num_splits(batch, num_kv_heads, q.device)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    block_d = triton.next_power_of_2(head_dim)
    if splits > 1:
        assert batch * num_kv_heads <= _MAX_COUNTERS, "too many (sequence, KV head) pairs for split decoding"
        partial = torch.empty((batch, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        lse = torch.empty((batch, num_heads, splits), dtype=torch.float32, device=q.device)
        arrivals = _arrivals(q.device)
    else:  # the kernel writes `out` directly; the partial buffers and counters are not touched
        partial, lse = out.view(batch, num_heads, 1, head_dim), out.view(batch, num_heads, head_dim)
        arrivals = seq_lens
    _decode_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, out, partial, lse, arrivals, table, rows, seq_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), out.stride(0), out.stride(1),
        table.stride(0), partial.stride(0), partial.stride(1), partial.stride(2), lse.stride(0), lse.stride(1),
        scale, num_kv_heads,
        # tl.dot needs at least 16 rows; unused rows of the group block are masked.
        GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_D=block_d,
        BLOCK_N=BLOCK_N, SPLITS=splits,
        PRECISION=dot_precision(q.dtype),
    )
    return out
