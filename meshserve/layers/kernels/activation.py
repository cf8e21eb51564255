"""Fused SiLU(gate) · up over the merged [gate | up] projection: one pass instead of three kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.layers.kernels.pdl import launch_dependents, pdl_enabled
from meshserve.layers.kernels.rounding import round_to

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(GateUp, Out, stride_in, stride_out, n_cols, PDL: tl.constexpr, BLOCK: tl.constexpr):
    launch_dependents(PDL)  # the down projection follows: let it start its weight stream
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(GateUp + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_in + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dtype = Out.dtype.element_ty
    act = round_to(gate / (1.0 + tl.exp(-gate)), dtype)  # silu, rounded like the reference's own kernel
    tl.store(Out + row * stride_out + cols, round_to(act * up, dtype).to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2 * n] (gate first) -> [T, n]."""
    n_rows, width = gate_up.shape
    n_cols = width // 2
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    out = torch.empty((n_rows, n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if n_rows:
        _silu_and_mul_kernel[(n_rows, triton.cdiv(n_cols, BLOCK))](
            gate_up, out, gate_up.stride(0), out.stride(0), n_cols, PDL=pdl_enabled(gate_up), BLOCK=BLOCK,
            num_warps=4)
    return out
