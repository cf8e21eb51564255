"""Block-wise FP8 GEMM in Triton (DeepSeek-V3's layout): out = x @ W.T where W is FP8 with one
scale per (bn x bk) block and x is quantized at run time with one scale per (token, bk columns)
group, so every K step of the kernel multiplies FP8 tiles on the tensor cores and applies one
activation scale per row and one weight scale per output column."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.layers.kernels.rounding import to_fp8_e4m3

_FP8_MAX = tl.constexpr(448.0)  # a jit'ed kernel reads only constexpr globals


@triton.jit
def _quantize_groups_kernel(X, Q, S, stride_x, stride_q, n_groups, GROUP: tl.constexpr, ub):
    """Row r, group g of x: scale = max|x| / 448 (at least 1e-12), q = x / scale in FP8."""
    r = tl.program_id(0)
    g = tl.program_id(1)
    offs = g * GROUP + tl.arange(0, GROUP)
    x = tl.load(X + r * stride_x + offs).to(tl.float32)
    scale = tl.maximum(tl.minimum(tl.max(tl.abs(x), axis=0), ub) / _FP8_MAX, 1e-12)
    tl.store(Q + r * stride_q + offs, to_fp8_e4m3(x / scale, Q.dtype.element_ty))
    tl.store(S + r * n_groups + g, scale)


def quantize_groups(x: torch.Tensor, group: int, ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K a multiple of group) -> (x8 [M, K] FP8, scales [M, K / group] float32)."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, k // group), dtype=torch.float32, device=x.device)
    if m:
        _quantize_groups_kernel[(m, k // group)](x, q, s, x.stride(0), q.stride(0), k // group, GROUP=group,
                                                 ub=float("inf") if ub is None else ub)
    return q, s


@triton.jit
def _block_gemm_kernel(A, B, C, As, Bs, M, N, K, stride_am, stride_bn, stride_cm, stride_asm, stride_bsn,
                       GROUP_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m, mask_n = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + offs_k
        a = tl.load(A + offs_m[:, None] * stride_am + k[None, :], mask=mask_m[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(B + offs_n[None, :] * stride_bn + k[:, None], mask=mask_n[None, :] & (k[:, None] < K), other=0.0)
        a_s = tl.load(As + offs_m * stride_asm + kb, mask=mask_m, other=0.0)
        b_s = tl.load(Bs + (offs_n // GROUP_N) * stride_bsn + kb, mask=mask_n, other=0.0)
        # One scale block per K step, promoted to float32 here: inside the dot, wgmma (sm_90,
        # BLOCK_M >= 64) sums FP8 products in its ~14-bit accumulator (DeepSeek-V3's scheme).
        acc += tl.dot(a, b).to(tl.float32) * a_s[:, None] * b_s[None, :]
    tl.store(C + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def block_fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                     bias: torch.Tensor | None = None, activation_ub: float | None = None) -> torch.Tensor:
    """x [..., K] @ (w8 [N, K] with block scales [ceil(N/bn), K/bk]).T -> [..., N] in x's dtype.
    K must be a multiple of bk (fp8.gemm_path checks)."""
    bn, bk = block
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k).contiguous()
    x8, x_scale = quantize_groups(x2, bk, activation_ub)
    m, n = x2.shape[0], w8.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m:
        block_m = 16 if m <= 16 else 64
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, 128))
        _block_gemm_kernel[grid](x8, w8, out, x_scale, scale, m, n, k, x8.stride(0), w8.stride(0), out.stride(0),
                                 x_scale.stride(0), scale.stride(0), GROUP_N=bn, BLOCK_M=block_m, BLOCK_N=128,
                                 BLOCK_K=bk, num_warps=4, num_stages=3)
    if bias is not None:
        out += bias
    return out.reshape(*lead, n)
