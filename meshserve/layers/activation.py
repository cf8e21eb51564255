"""Gated activation of the MLP: silu(gate) * up over a merged [gate | up] projection (one fused
Triton kernel for CUDA tensors)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if gate_up.is_cuda:
        from meshserve.layers.kernels.activation import silu_and_mul as fused

        return fused(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
