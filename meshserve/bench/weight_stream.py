"""A plain read of a tensor's bytes at the GPU's best streaming rate, for floors: what a decode
GEMM at batch 1 would cost if it did no arithmetic at all. Each program sums one contiguous
chunk (BLOCK elements per load step) and stores one float, so the kernel reads every byte once
and writes next to nothing. Its tiling is the best of a sweep on an H200 (docs/benchmarks.md,
seventh session): 2,048-element steps, 8 warps, 8 programs per SM; for the Llama-3.1-8B layers
it reads at 3.5 TB/s (a 32 MB weight) to 4.6 TB/s (the 1 GB LM head)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.layers.kernels.device import sm_count

BLOCK = 2048
PROGRAMS_PER_SM = 8
NUM_WARPS = 8


@triton.jit
def _read_kernel(W, OUT, NUMEL, PER_PROGRAM, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * PER_PROGRAM
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, PER_PROGRAM, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        acc += tl.load(W + offs, mask=offs < NUMEL, other=0.0).to(tl.float32)
    tl.store(OUT + tl.program_id(0), tl.sum(acc))


def stream(w: torch.Tensor) -> torch.Tensor:
    """Reads every element of the contiguous `w` once; returns one float32 partial sum per program."""
    numel = w.numel()
    per_program = triton.cdiv(triton.cdiv(numel, PROGRAMS_PER_SM * sm_count(w.device)), BLOCK) * BLOCK
    programs = triton.cdiv(numel, per_program)
    out = torch.empty(programs, dtype=torch.float32, device=w.device)
    _read_kernel[(programs,)](w, out, numel, per_program, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out
