"""The skinny GEMM of decode: out = x @ W.T for few rows x (bf16, fp16 or fp32) and a weight W
[N, K] that is either FP8 (W8A16, with per-row scales [N, 1] or per (bn x bk) block scales) or
in x's own dtype.

A decode GEMM is bound by the weight's bytes, not by arithmetic, so this kernel streams the weight
once and spends nothing on the activations. An FP8 weight needs no activation quantization (the
`_scaled_mm` path's extra kernel and its rounding): each FP8 tile is converted in registers to x's
dtype (exact: every e4m3 value is a bf16/fp16/fp32 value) and multiplied on the tensor cores with
float32 accumulation. Scales are applied after the dot: per row once at the end, per block after
each K step (BLOCK_K divides the block's bk, so a step lies in one block column). A weight in x's
dtype is multiplied as it is.

The FP8 conversion is the kernel's only per-byte arithmetic and can bound it: Triton's e4m3 -> bf16
on sm_90 is cvt e4m3x2 -> f16x2, then one F2F f16 -> bf16 per element, and the F2F pipe does 16
per clock per SM, about 4.2 TB/s of weights on 132 SMs at 1.98 GHz, no more than HBM gives. For
bf16 on CUDA the kernel therefore converts with integer bit moves and one packed multiply
(`rounding.e4m3_to_bf16`: 5 instructions per 2 elements on the integer and FMA pipes; F2F count 0 in
the compiled loop). fp16 keeps Triton's conversion (one cvt per 2 elements, no F2F); Triton's
interpreter, which cannot run PTX, uses Triton's conversion for every dtype.

Tiles: one program owns BLOCK_N weight rows and one of `split_k` slices of K, reading the rows'
contiguous K bytes in K steps of BLOCK_K_BYTES. Rows of x are padded to BLOCK_M >= 16 by masks
(tl.dot's minimum), for M = 1 too: the padded MMA rows cost tensor-core cycles a memory-bound
kernel has to spare, whereas a multiply-add GEMV is FMA-bound from M of about 7 (2·M flops per
weight byte at 4.8 TB/s is 67 TFLOP/s at M = 7, the H200's float32 FMA peak), so one tile shape
serves every M. With split_k > 1 the slices write float32 partial sums and a second kernel adds
them in a fixed order (deterministic, unlike atomics) with the bias; with split_k = 1 the first
kernel finishes.

With `pdl` on sm_90+ both kernels are launched with programmatic dependent launch (kernels/pdl.py):
each program first asks L2 for the first PREFETCH_BYTES of its weight slice, then waits for the
kernel before it, so the weight stream starts in the previous kernel's tail instead of after it.

CUDA-graph safe: the launch reads only shapes and the (cached) SM count, and allocates only the
output and, with split_k > 1, a partial-sum buffer, both sized by the shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from meshserve.layers.kernels.device import sm_count
from meshserve.layers.kernels.pdl import launch_dependents, pdl_enabled, prefetch_rows_l2, wait_for_primary
from meshserve.layers.kernels.rounding import e4m3_to_bf16

# Tile sizes. A K step of 256 bytes is two 128-byte lines of a weight row (256 FP8 or 128 bf16
# columns). Built for sm_90 on the CPU at BLOCK_M = 16, FP8: 94 registers, 48 KB of shared memory
# (3 stages; 4 programs fit an SM), 614 instructions per warp and K step (4 KB of weights), mma.sync.
# BLOCK_M = 64 takes wgmma and half the K step (BLOCK_K_BYTES_WIDE_M), else 160 KB of shared memory
# would leave one program per SM.
BLOCK_N = 64
BLOCK_K_BYTES = 256
BLOCK_K_BYTES_WIDE_M = 128
# Programs per SM the split of K aims for: enough resident programs to keep many weight loads
# in flight (the grid of a 4096-row weight is only 64 tiles of BLOCK_N rows for 132 SMs).
PROGRAMS_PER_SM = 2
MAX_SPLIT_K = 16
# Weight bytes each program asks L2 for before waiting for the previous kernel (PDL). Measured in
# a Llama-3.1-8B batch-1 decode step on an H200 (bench_one_batch, docs/benchmarks.md): 4 KB per
# program 4.495 ms, 32 bytes 4.501 ms, 32 KB 4.682 ms (worse than cuBLAS's 4.59; presumably the
# early programs' prefetches crowd out the previous kernel's own loads, not examined further).
PREFETCH_BYTES = 4 * 1024


@dataclass(frozen=True)
class SkinnyTiles:
    """How one call is cut: BLOCK_M x BLOCK_N output tiles, K in `split_k` slices of
    `k_per_split` columns (a multiple of block_k)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_per_split: int


def skinny_tiles(m: int, n: int, k: int, sms: int, block_k_divides: int | None = None,
                 weight_bytes: int = 1) -> SkinnyTiles:
    """The tiles for x [m, k] @ W[n, k].T on `sms` SMs, W of `weight_bytes` per element. With
    block scales, `block_k_divides` is the block's bk: each K step must lie within one block column."""
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    # With blocks: the largest power of two dividing bk (tl.arange sizes are powers of two).
    widest = (BLOCK_K_BYTES if block_m < 64 else BLOCK_K_BYTES_WIDE_M) // weight_bytes
    block_k = widest if block_k_divides is None else min(widest, block_k_divides & -block_k_divides)
    if block_k < 16:
        raise ValueError(f"FP8 block width {block_k_divides}: no K step of at least 16 (tl.dot's) lies in one block")
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, BLOCK_N)
    steps = triton.cdiv(k, block_k)
    split = 1
    while tiles * split < PROGRAMS_PER_SM * sms and split * 2 <= min(MAX_SPLIT_K, steps):
        split *= 2
    per_split = triton.cdiv(steps, split)
    split = triton.cdiv(steps, per_split)  # no empty slice
    return SkinnyTiles(block_m, BLOCK_N, block_k, split, per_split * block_k)


@triton.jit
def _skinny_kernel(X, W, S, B, OUT, M, N, K, K_PER_SPLIT, PREFETCH_K, stride_xm, stride_wn, stride_sn, stride_sk,
                   stride_om, stride_os, SCALES: tl.constexpr, GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
                   HAS_BIAS: tl.constexpr, PARTIAL: tl.constexpr, PRECISION: tl.constexpr, EVEN_K: tl.constexpr,
                   BF16_ASM: tl.constexpr, PDL: tl.constexpr, W_BYTES: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (n tile, K slice, m tile). SCALES: "none" (W in x's dtype), "rows" or "blocks".
    PARTIAL: store float32 sums of this slice at OUT[slice]; else the finished rows (bias added,
    in OUT's dtype). PDL: prefetch PREFETCH_K columns of each weight row of the slice, then wait
    for the previous kernel; nothing else is read or written before the wait."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    k_start = pid_s * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)
    launch_dependents(PDL)
    # Rows past N prefetch row N - 1 again. The size is a multiple of 16 bytes: the launcher
    # enables PDL only for rows and slices of whole 16-byte units.
    prefetch_rows_l2(W + tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn + k_start,
                     tl.full([BLOCK_N], 0, tl.int32) + tl.minimum(k_end - k_start, PREFETCH_K) * W_BYTES, PDL)
    wait_for_primary(PDL)
    # int64 row offsets: N * K passes 2**31 bytes for the largest FP8 layers.
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = W + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + offs_k
        # w is [BLOCK_K, BLOCK_N], K contiguous in memory: each weight row is read along K. Without
        # a ragged last K step the masks are constant along K, so the loads stay 16-byte vectors.
        if EVEN_K:
            x = tl.load(x_rows + k[None, :], mask=mask_m[:, None], other=0.0)
            w = tl.load(w_rows + k[:, None], mask=mask_n[None, :], other=0.0)
        else:
            x = tl.load(x_rows + k[None, :], mask=mask_m[:, None] & (k < K)[None, :], other=0.0)
            w = tl.load(w_rows + k[:, None], mask=mask_n[None, :] & (k < K)[:, None], other=0.0)
        if BF16_ASM:
            w = e4m3_to_bf16(w)
        else:
            w = w.to(x.dtype)
        if SCALES == "blocks":
            s = tl.load(S + (offs_n // GROUP_N) * stride_sn + (k0 // GROUP_K) * stride_sk, mask=mask_n, other=0.0)
            acc += tl.dot(x, w, input_precision=PRECISION) * s[None, :]
        else:
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if SCALES == "rows":
        acc *= tl.load(S + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    out = OUT + offs_m[:, None] * stride_om + offs_n[None, :]
    if PARTIAL:
        tl.store(out + pid_s * stride_os, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(B + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _sum_slices_kernel(P, B, OUT, M, N, stride_ps, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr,
                       BLOCK: tl.constexpr):
    """OUT[m, n] = sum over slices s in order of P[s, m, n] (+ bias[n]), in OUT's dtype; P and
    OUT are contiguous [M, N]. PDL: launched early, it waits for the slices' kernel first."""
    launch_dependents(PDL)
    wait_for_primary(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.load(P + offs, mask=mask, other=0.0)
    for s in range(1, SPLIT):
        acc += tl.load(P + s * stride_ps + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(B + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=mask)


def skinny_linear(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, block: tuple[int, int] | None = None,
                  tiles: SkinnyTiles | None = None, pdl: bool = False) -> torch.Tensor:
    """x [..., K] @ W.T (+ bias) -> [..., N] in x's dtype, where W is `w` [N, K] in x's dtype
    (`scale` None) or FP8 `w` times its per-row [N, 1] or per-block `scale`. `tiles` overrides the
    heuristic (tests, tuning). `pdl`: launch with programmatic dependent launch where the device
    has it (layers/dense.py measured it for bf16 weights; FP8 calls do not ask for it yet)."""
    lead, k = x.shape[:-1], x.shape[-1]
    if w.shape[1] != k or w.stride(1) != 1:
        raise ValueError(f"skinny GEMM: weight {tuple(w.shape)} with strides {w.stride()} for input width {k}; "
                         "it reads rows of K contiguous elements")
    dense = scale is None  # a weight in x's dtype, multiplied as it is
    if dense != (w.dtype == x.dtype) or (dense and block is not None):
        raise ValueError(f"skinny GEMM: a {w.dtype} weight {'without' if dense else 'with'} scales for "
                         f"{x.dtype} activations; it takes an FP8 weight with scales or one in the activations' dtype")
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m, n, w_bytes = x2.shape[0], w.shape[0], w.element_size()
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*lead, n)
    if tiles is None:
        tiles = skinny_tiles(m, n, k, sm_count(x.device) if x.is_cuda else 1, block[1] if block is not None else None,
                             w_bytes)
    # Bulk prefetches take whole 16-byte units at 16-byte-aligned addresses (every slice starts
    # on a K step, a multiple of 16 bytes).
    pdl = pdl and pdl_enabled(x) and (k * w_bytes) % 16 == 0 and (w.stride(0) * w_bytes) % 16 == 0 \
        and w.data_ptr() % 16 == 0
    prefetch_k = max(16, PREFETCH_BYTES // (tiles.block_n * w_bytes))
    group_n, group_k = block if block is not None else (1, 1)
    grid = (triton.cdiv(n, tiles.block_n), tiles.split_k, triton.cdiv(m, tiles.block_m))
    partial = tiles.split_k > 1
    dest = torch.empty((tiles.split_k, m, n), dtype=torch.float32, device=x.device) if partial else out
    bias_arg = bias if bias is not None else out  # never read without HAS_BIAS
    scale_arg = out if dense else scale  # never read with SCALES "none"
    launch = {"launch_pdl": True} if pdl else {}
    _skinny_kernel[grid](x2, w, scale_arg, bias_arg, dest, m, n, k, tiles.k_per_split, prefetch_k, x2.stride(0),
                         w.stride(0), scale_arg.stride(0), scale_arg.stride(1), n, m * n,
                         SCALES="none" if dense else "rows" if block is None else "blocks",
                         GROUP_N=group_n, GROUP_K=group_k, HAS_BIAS=bias is not None, PARTIAL=partial,
                         PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # float32: true products
                         EVEN_K=k % tiles.block_k == 0,
                         BF16_ASM=not dense and x.dtype == torch.bfloat16 and x.is_cuda, PDL=pdl,
                         W_BYTES=w_bytes, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                         BLOCK_K=tiles.block_k, num_warps=4, num_stages=3, **launch)
    if partial:
        reduce_block = 1024
        _sum_slices_kernel[(triton.cdiv(m * n, reduce_block),)](dest, bias_arg, out, m, n, m * n,
                                                                SPLIT=tiles.split_k, HAS_BIAS=bias is not None,
                                                                PDL=pdl, BLOCK=reduce_block, num_warps=4, **launch)
    return out.reshape(*lead, n)
