"""Programmatic dependent launch (PDL, Hopper and newer): let a decode GEMM start streaming its
weights while the kernel before it is still finishing.

At batch 1 every linear layer of a decode step is a short weight stream (12-60 µs for an 8B
model's layers), and each ends and starts with a bubble: the last programs' tail, the next
launch, the first loads' latency. Weights do not depend on the previous kernel, only the
activations do. So a GEMM launched with PDL (`launch_pdl=True`) may begin before its
predecessor completes; its programs prefetch their first weight bytes into L2, then wait
(`wait_for_primary`) for the predecessor to complete and its writes to be visible, and only
then read the activations and write anything.

Invariants that make this safe:
* A kernel launched with PDL calls `wait_for_primary` in every program before it reads any
  tensor another kernel writes, and before it writes anything (its output buffer may be one the
  predecessor still reads). Weights, written once at load time, may be read before.
* The wait covers every earlier kernel too: the predecessor either was launched normally (so all
  before it had completed) or waited itself.
* `launch_dependents` in a predecessor only lets the next kernel's programs be scheduled early;
  it is a no-op when the next kernel was launched without PDL. Kernels that precede a decode
  GEMM (RMSNorm, SiLU·mul, decode attention) call it first thing.

On the CPU (Triton's interpreter) and on GPUs before sm_90 every flag here is False and the
kernels compile without the instructions.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from meshserve.layers.kernels.device import capability


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels on `t`'s device use PDL: CUDA, compiled (not the interpreter), sm_90+."""
    if not t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return capability(t.device) >= (9, 0)


@triton.jit
def launch_dependents(ENABLED: tl.constexpr):
    """Let the next kernel, if launched with PDL, be scheduled now (see the module docstring)."""
    if ENABLED:
        gdc_launch_dependents()


@triton.jit
def wait_for_primary(ENABLED: tl.constexpr):
    """Block until the previous kernel has completed and its writes are visible."""
    if ENABLED:
        gdc_wait()


@triton.jit
def prefetch_rows_l2(rows, nbytes, ENABLED: tl.constexpr):
    """Start pulling `nbytes` (a multiple of 16) from each 16-byte-aligned address in `rows` into
    L2 (Hopper's bulk prefetch: no registers, no waiting, nothing is loaded into the program).
    Elements repeated across threads prefetch twice, which costs only an instruction."""
    if ENABLED:
        tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2;\n mov.u32 $0, 0;", "=r,l,r",
                                  [rows.to(tl.int64, bitcast=True), nbytes], dtype=tl.int32, is_pure=False, pack=1)
