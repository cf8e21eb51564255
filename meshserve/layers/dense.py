"""The GEMM of a linear layer whose weight is in the model's dtype (no quantization): cuBLAS, or
for a decode-sized call on sm_90+ the skinny kernel (kernels/skinny_gemm.py) launched with
programmatic dependent launch.

At decode sizes the GEMM is a stream of the weight's bytes. cuBLAS reaches about 75 % of the
H200's HBM bandwidth over a Llama-3.1-8B batch-1 step (4.21 ms for 15.0 GB, docs/benchmarks.md);
part of the rest is lost between kernels, where one layer's stream ends and the next one's has
not started. The skinny kernel starts its stream in the previous kernel's tail (kernels/pdl.py).
Measured in that model's decode step on an H200 (bench_one_batch, same run): 4.496 / 4.564 /
4.701 ms at batch 1 / 2 / 4 against cuBLAS's 4.591 / 4.629 / 4.766 (2.1 / 1.4 / 1.4 % faster),
but 4.88 against 4.84 ms at batch 8. Without PDL the same kernel only equals cuBLAS (4.59 ms at
batch 1), so the gain is the overlap, not the kernel. Larger calls, and GPUs without PDL, keep
cuBLAS.

MESHSERVE_DENSE_GEMM=cublas keeps cuBLAS for every call (A/B benchmarks); read once at import.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

# Calls of at most this many rows take the skinny kernel (the measurement above).
SKINNY_MAX_M = 4
_CHOICES = ("auto", "cublas")
_CHOICE = os.environ.get("MESHSERVE_DENSE_GEMM", "auto")
if _CHOICE not in _CHOICES:
    raise ValueError(f"MESHSERVE_DENSE_GEMM={_CHOICE!r}: expected one of {', '.join(_CHOICES)}")


def takes_skinny(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `dense_linear(x, weight)` runs the skinny kernel."""
    return (_CHOICE == "auto" and weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype
            and x.numel() <= SKINNY_MAX_M * x.shape[-1] and _pdl_device(x))


def _pdl_device(x: torch.Tensor) -> bool:
    """x is on a GPU with programmatic dependent launch. Triton, which kernels/pdl.py imports, is
    not a dependency of CPU installs, so it is imported for CUDA tensors only."""
    if not x.is_cuda:
        return False
    from meshserve.layers.kernels.pdl import pdl_enabled

    return pdl_enabled(x)


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight [out, in].T (+ bias) -> [..., out], like F.linear."""
    if takes_skinny(x, weight):
        from meshserve.layers.kernels.skinny_gemm import skinny_linear

        return skinny_linear(x, weight, None, bias, pdl=True)
    return F.linear(x, weight, bias)
