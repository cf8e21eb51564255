"""The routed experts on the GPU: two grouped GEMMs in Triton over the (token, expert) pairs
sorted by expert, with the activation between them.

    pairs sorted by expert, each expert's run padded to whole BLOCK_M blocks
    GEMM 1: h[pair]  = x[pair // top_k] @ w13[expert]^T          [pairs, 2I]
            a[pair]  = silu(h_gate) * h_up                         [pairs, I]
    GEMM 2: y[pair]  = weight[pair] * (a[pair] @ w2[expert]^T)     [pairs, H]
    out[t]  = sum over t's top_k pairs of y                        [T, H]

Each program computes one BLOCK_M × BLOCK_N tile of one block, which belongs to one expert, so
it streams that expert's weights once for up to BLOCK_M tokens.

FP8 experts (W8A16): the kernel loads FP8 weight tiles (half the bytes, which is what a
memory-bound decode step pays for), widens them to the activations' dtype (bf16 on CUDA by the
skinny FP8 kernel's bit-move conversion, kernels/fp8_skinny_gemm.py says why), and multiplies each
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

from meshserve.layers.activation import silu_and_mul
from meshserve.layers.attention.triton_paged import dot_precision
from meshserve.layers.kernels.fp8_skinny_gemm import e4m3_to_bf16
from meshserve.layers.moe.experts import ExpertScales
from meshserve.layers.moe.pair_sort import sort_pairs

BLOCK_M = 16  # decode batches give each expert a few tokens; small blocks waste little padding
BLOCK_N = 64
BLOCK_K = 64


@triton.jit
def _grouped_gemm(
    A, W, C, SortedPairs, BlockExpert, NumBlocks, PairWeights, Scale,
    num_pairs, N, K, stride_am, stride_we, stride_wn, stride_wk, stride_cm, stride_se, stride_sn, stride_sk,
    group_n, group_k,
    TOP_K: tl.constexpr, ROWS_PER_TOKEN: tl.constexpr, WEIGHTED: tl.constexpr, FP8_WEIGHTS: tl.constexpr,
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
    rows = pairs // TOP_K if ROWS_PER_TOKEN else pairs  # GEMM 1 reads the token's row, GEMM 2 the pair's
    expert = tl.load(BlockExpert + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(A + rows[:, None] * stride_am + offs_k[None, :], mask=valid[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(W + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        if FP8_WEIGHTS:
            scale = tl.load(Scale + expert * stride_se + (offs_n // group_n) * stride_sn + (k0 // group_k) * stride_sk,
                            mask=mask_n, other=0.0)
            if BF16_ASM:
                w = e4m3_to_bf16(w)
            else:
                w = w.to(a.dtype)
            acc += tl.dot(a, w, input_precision=PRECISION) * scale[None, :]
        else:
            acc += tl.dot(a, w, input_precision=PRECISION)
    if WEIGHTED:
        acc *= tl.load(PairWeights + pairs, mask=valid, other=0.0)[:, None]
    tl.store(C + pairs[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=valid[:, None] & mask_n[None, :])


def _gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_pairs: torch.Tensor, block_expert: torch.Tensor,
          num_blocks: torch.Tensor, pair_weights: torch.Tensor | None, top_k: int, rows_per_token: bool,
          scale: torch.Tensor | None, block: tuple[int, int] | None) -> None:
    n, k = w.shape[1], w.shape[2]
    block_k = BLOCK_K
    if scale is None:
        group_n, group_k = 1, 1  # unused
    elif block is None:  # per channel: the block (1, K)
        group_n, group_k = 1, k
    else:
        group_n, group_k = block
        block_k = min(BLOCK_K, group_k)  # divides group_k: FusedExperts admits powers of two >= 16 on CUDA
    grid = (block_expert.numel(), triton.cdiv(n, BLOCK_N))
    _grouped_gemm[grid](
        a, w, out, sorted_pairs, block_expert, num_blocks, out if pair_weights is None else pair_weights,
        out if scale is None else scale,
        out.shape[0], n, k, a.stride(0), w.stride(0), w.stride(1), w.stride(2), out.stride(0),
        *(scale.stride() if scale is not None else (0, 0, 0)), group_n, group_k,
        TOP_K=top_k, ROWS_PER_TOKEN=rows_per_token, WEIGHTED=pair_weights is not None, FP8_WEIGHTS=scale is not None,
        BF16_ASM=scale is not None and a.dtype == torch.bfloat16 and a.is_cuda,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=block_k, PRECISION=dot_precision(a.dtype))


def fused_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, scales: ExpertScales | None = None, load: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as experts.experts_reference: x [T, H], w13 [E, 2I, H], w2 [E, H, I]
    (FP8 with `scales`, else x's dtype), weights/ids [T, top_k] -> [T, H] in x's dtype. `load`
    [E + 1]: each expert's pair count is added to it (FusedExperts.load's layout), by the sort."""
    tokens, top_k = ids.shape
    assert x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1
    block = None if scales is None else scales.block
    sorted_pairs, block_expert, num_blocks = sort_pairs(ids, w13.shape[0], BLOCK_M, load)
    h = torch.empty(tokens * top_k, w13.shape[1], dtype=x.dtype, device=x.device)
    _gemm(x, w13, h, sorted_pairs, block_expert, num_blocks, None, top_k, rows_per_token=True,
          scale=None if scales is None else scales.w13, block=block)
    a = silu_and_mul(h)
    y = torch.zeros(tokens * top_k, w2.shape[1], dtype=x.dtype, device=x.device)  # pairs of other ranks stay 0
    _gemm(a, w2, y, sorted_pairs, block_expert, num_blocks, weights.flatten().float().contiguous(), top_k,
          rows_per_token=False, scale=None if scales is None else scales.w2, block=block)
    return y.view(tokens, top_k, w2.shape[1]).sum(dim=1)
