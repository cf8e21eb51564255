"""The routed experts on the GPU: two grouped GEMMs in Triton over the (token, expert) pairs
sorted by expert (pair_sort.py), the activation in the first one's epilogue.

    pairs sorted by expert, each expert's run padded to whole BLOCK_M blocks
    GEMM 1: h[pair]  = x[pair // top_k] @ w13[expert]^T          (gate and up tiles, in registers)
            a[pair]  = silu(h_gate) * h_up                         [pairs, I]
    GEMM 2: y[pair]  = weight[pair] * (a[pair] @ w2[expert]^T)     [pairs, H]
    out[t]  = sum over t's top_k pairs of this rank of y           [T, H]

Four launches per call (sort, two GEMMs, sum), a fixed cost that matters at decode, where a
layer's touched weights take ~16 us to read. Each GEMM program computes one BLOCK_M × BLOCK_N
tile of one block, which belongs to one expert, so it streams that expert's weights once for up
to BLOCK_M tokens; GEMM 1's program holds the gate tile and the matching up tile (rows I + n)
and rounds both, and the activation, where the separate GEMM output and activation kernel would
(the same numbers). y's rows of other ranks' pairs (id -1) are never written and the sum skips
them, so y needs no zeroing; the sum runs in float32 in choice order (deterministic).

FP8 experts (W8A16): the kernel loads FP8 weight tiles (half the bytes, which is what a
memory-bound decode step pays for), widens them to the activations' dtype (bf16 on CUDA by the
skinny FP8 kernel's bit-move conversion, kernels/skinny_gemm.py says why), and multiplies each
K tile's partial product by the weight scale of its (output column, K block): one scale per
(GROUP_N rows, GROUP_K columns) block of the expert; per-channel scales are the block
(1, K). A K tile must lie inside one scale block, so BLOCK_K divides the block's bk (both
powers of two, bk >= 16). Activations are not quantized: exact up to float rounding against
the dequantized expert, and no activation scales to compute per token and K group. No host value is read: the grid
is sized for the worst padding (every expert's last block partly empty) and programs past the
real number of blocks return at once, so a decode step stays capturable in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.layers.attention.triton_paged import dot_precision
from meshserve.layers.kernels.rounding import e4m3_to_bf16, round_to
from meshserve.layers.moe.experts import ExpertScales
from meshserve.layers.moe.pair_sort import sort_pairs

BLOCK_M = 16  # decode batches give each expert a few tokens; small blocks waste little padding
BLOCK_N = 64
BLOCK_K = 64
SUM_BLOCK = 1024  # hidden columns per program of the final per-token sum


@triton.jit
def _tile_dot(acc, a, W, Scale, rows_n, offs_k, k0, mask_n, mask_k, stride_wn, stride_wk, stride_sn, stride_sk,
              group_n, group_k, FP8_WEIGHTS: tl.constexpr, BF16_ASM: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a @ W[rows_n, offs_k]^T (W, Scale: this expert's); FP8 tiles widened and scaled
    per (row block, K block)."""
    w = tl.load(W + rows_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=mask_n[None, :] & mask_k[:, None], other=0.0)
    if FP8_WEIGHTS:
        scale = tl.load(Scale + (rows_n // group_n) * stride_sn + (k0 // group_k) * stride_sk, mask=mask_n, other=0.0)
        if BF16_ASM:
            w = e4m3_to_bf16(w)
        else:
            w = w.to(a.dtype)
        return acc + tl.dot(a, w, input_precision=PRECISION) * scale[None, :]
    return acc + tl.dot(a, w, input_precision=PRECISION)


@triton.jit
def _grouped_gemm(
    A, W, C, SortedPairs, BlockExpert, NumBlocks, PairWeights, Scale,
    num_pairs, N, K, stride_am, stride_we, stride_wn, stride_wk, stride_cm, stride_se, stride_sn, stride_sk,
    group_n, group_k,
    TOP_K: tl.constexpr, GATED: tl.constexpr, WEIGHTED: tl.constexpr, FP8_WEIGHTS: tl.constexpr,
    BF16_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m >= tl.load(NumBlocks):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(SortedPairs + offs_m)  # padding entries hold num_pairs
    valid = pairs < num_pairs
    rows = pairs // TOP_K if GATED else pairs  # GEMM 1 reads the token's row, GEMM 2 the pair's
    expert = tl.load(BlockExpert + pid_m).to(tl.int64)
    W += expert * stride_we
    Scale += expert * stride_se
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # GATED: rows N + offs_n of w13
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(A + rows[:, None] * stride_am + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        acc = _tile_dot(acc, a, W, Scale, offs_n, offs_k, k0, mask_n, mask_k, stride_wn, stride_wk, stride_sn,
                        stride_sk, group_n, group_k, FP8_WEIGHTS, BF16_ASM, PRECISION)
        if GATED:
            acc_up = _tile_dot(acc_up, a, W, Scale, N + offs_n, offs_k, k0, mask_n, mask_k, stride_wn, stride_wk,
                               stride_sn, stride_sk, group_n, group_k, FP8_WEIGHTS, BF16_ASM, PRECISION)
    dtype = C.dtype.element_ty
    if GATED:  # silu(gate) * up, rounded where the unfused GEMM output and activation kernel round
        gate = round_to(acc, dtype)
        acc = round_to(round_to(gate / (1.0 + tl.exp(-gate)), dtype) * round_to(acc_up, dtype), dtype)
    if WEIGHTED:
        acc *= tl.load(PairWeights + pairs, mask=valid, other=0.0)[:, None]
    tl.store(C + pairs[:, None] * stride_cm + offs_n[None, :], acc.to(dtype), mask=valid[:, None] & mask_n[None, :])


@triton.jit
def _sum_pairs(Y, Ids, Out, H, stride_y, stride_out, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum over t's pairs of this rank (id >= 0; the others' rows of y were never
    written) of y, in float32, in choice order."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        pair = token * TOP_K + k
        own = tl.load(Ids + pair) >= 0
        acc += tl.load(Y + pair * stride_y + offs, mask=mask & own, other=0.0).to(tl.float32)
    tl.store(Out + token * stride_out + offs, acc.to(Out.dtype.element_ty), mask=mask)


def _gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_pairs: torch.Tensor, block_expert: torch.Tensor,
          num_blocks: torch.Tensor, pair_weights: torch.Tensor | None, top_k: int, gated: bool,
          scale: torch.Tensor | None, block: tuple[int, int] | None) -> None:
    """out[pair] = a[row] @ w[expert]^T, over out's columns n (gated: w's first n rows are the
    gate, the next n the up projection, and out gets silu(gate) * up)."""
    n, k = out.shape[1], w.shape[2]
    block_k = BLOCK_K
    if scale is None:
        group_n, group_k = 1, 1  # unused
    elif block is None:  # per channel: the block (1, K)
        group_n, group_k = 1, k
    else:
        group_n, group_k = block
        block_k = min(BLOCK_K, group_k)  # divides group_k: FusedExperts admits powers of two >= 16 on CUDA
    # Gated: half-width tiles, so each program still streams BLOCK_N weight rows (gate + up) per
    # K step and a decode step keeps as many programs, hence bytes in flight, as over all 2I rows.
    block_n = BLOCK_N // 2 if gated else BLOCK_N
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _grouped_gemm[grid](
        a, w, out, sorted_pairs, block_expert, num_blocks, out if pair_weights is None else pair_weights,
        out if scale is None else scale,
        out.shape[0], n, k, a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        *(scale.stride() if scale is not None else (0, 0, 0)), group_n, group_k,
        TOP_K=top_k, GATED=gated, WEIGHTED=pair_weights is not None, FP8_WEIGHTS=scale is not None,
        BF16_ASM=scale is not None and a.dtype == torch.bfloat16 and a.is_cuda,
        BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=dot_precision(a.dtype))


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, scales: ExpertScales | None = None,
                  load: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as experts.experts_reference: x [T, H], w13 [E, 2I, H], w2 [E, H, I]
    (FP8 with `scales`, else x's dtype), weights/ids [T, top_k] -> [T, H] in x's dtype. `load`
    [E + 1]: each expert's pair count is added to it (FusedExperts.load's layout), by the sort."""
    tokens, top_k = ids.shape
    hidden = w2.shape[1]
    assert x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1
    out = torch.empty(tokens, hidden, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    block = None if scales is None else scales.block
    ids = ids.contiguous()
    sorted_pairs, block_expert, num_blocks = sort_pairs(ids, w13.shape[0], BLOCK_M, load)
    a = torch.empty(tokens * top_k, w13.shape[1] // 2, dtype=x.dtype, device=x.device)
    _gemm(x, w13, a, sorted_pairs, block_expert, num_blocks, None, top_k, gated=True,
          scale=None if scales is None else scales.w13, block=block)
    y = torch.empty(tokens * top_k, hidden, dtype=x.dtype, device=x.device)  # rows of other ranks' pairs unwritten
    # The router's weights are float32 already: flatten is a view and float() a no-op, no copy per call.
    _gemm(a, w2, y, sorted_pairs, block_expert, num_blocks, weights.flatten().float().contiguous(), top_k,
          gated=False, scale=None if scales is None else scales.w2, block=block)
    _sum_pairs[(tokens, triton.cdiv(hidden, SUM_BLOCK))](y, ids, out, hidden, y.stride(0), out.stride(0),
                                                         TOP_K=top_k, BLOCK_H=SUM_BLOCK)
    return out
