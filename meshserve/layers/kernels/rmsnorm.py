"""Fused RMSNorm: optionally adds the residual stream first, then normalises in float32 — one
read of each input row and one write of each output instead of about eight separate kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.layers.kernels.pdl import launch_dependents, pdl_enabled
from meshserve.layers.kernels.rounding import round_to


@triton.jit
def _rmsnorm_kernel(X, Residual, Out, ResidualOut, W, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr, BLOCK: tl.constexpr):
    launch_dependents(PDL)  # a decode GEMM usually follows: let it start its weight stream
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dtype = X.dtype.element_ty
    h = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0)
        h = round_to(h + r.to(tl.float32), dtype)  # the reference's x + residual
        tl.store(ResidualOut + row * stride_ro + cols, h.to(dtype), mask=mask)
    variance = tl.sum(h * h, axis=0) / n_cols
    h = round_to(h * tl.rsqrt(variance + eps), dtype)  # normalised, back in the input dtype
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    out_dtype = Out.dtype.element_ty
    tl.store(Out + row * stride_o + cols, round_to(h * w, out_dtype).to(out_dtype), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x (and residual): [..., hidden]. Without residual: weight * norm(x). With it:
    (weight * norm(x + residual), x + residual)."""
    shape = x.shape
    x2 = _rows(x)
    n_rows, n_cols = x2.shape
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    # Without a residual the kernel touches neither the residual input nor its output.
    r2 = x2 if residual is None else _rows(residual)
    summed = out if residual is None else torch.empty_like(x2)
    block = triton.next_power_of_2(n_cols)
    if n_rows:
        _rmsnorm_kernel[(n_rows,)](x2, r2, out, summed, weight, x2.stride(0), r2.stride(0), out.stride(0),
                                   summed.stride(0), n_cols, eps, HAS_RESIDUAL=residual is not None,
                                   PDL=pdl_enabled(x2), BLOCK=block,
                                   num_warps=min(8, max(1, block // 256)))
    return out.view(shape) if residual is None else (out.view(shape), summed.view(shape))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., hidden] as [rows, hidden] with unit stride along hidden."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()
