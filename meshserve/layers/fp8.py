"""FP8 (e4m3) linear algebra: quantize, dequantize, and the GEMM paths of an FP8 linear layer.

A quantized weight is `w8` (torch.float8_e4m3fn, [out, in]) and a float32 `scale` that
multiplies it: per channel [out, 1], or per (bn x bk) block [ceil(out/bn), ceil(in/bk)].

GEMM paths (one per layer, chosen at construction from the device, logged at start-up):

* `scaled_mm`: CUDA with FP8 tensor cores (compute capability >= 8.9) and per-channel scales:
  activations are quantized per token at run time (or with the checkpoint's static scale) and
  `torch._scaled_mm` multiplies with row-wise scales, output in bfloat16.
* `triton_block`: CUDA with FP8 tensor cores and block-wise scales (DeepSeek-V3): activations
  quantized per (token, bk columns) group, then a Triton GEMM applying both scales per K block
  (kernels/fp8_gemm.py). Needs in_features to be a multiple of bk.

  On both paths a call of at most SKINNY_MAX_M rows (decode) runs the skinny W8A16 kernel
  instead (kernels/skinny_gemm.py): the FP8 weight streamed once, activations unquantized.
  Its numbers are then those of the dequantized model (the CPU reference) up to float32
  summation order, so a decode step is closer to the reference than a prefill, never further.
* `dequant`: the weight is dequantized to the activation dtype and multiplied by F.linear.
  The CPU reference path (every CI test), and the stated fallback on CUDA for GPUs without FP8,
  for float16/float32 models with per-channel scales (`_scaled_mm`'s row-wise scaling gives
  bfloat16 only), for layers whose sizes are not multiples of 16 (`_scaled_mm`'s requirement)
  and for block-wise layers whose input is not whole blocks. On the CPU it is
  exactly the model with dequantized weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1e-12  # an all-zero row or block gets this scale instead of 0 (no division by 0)
# Calls with at most this many rows take the skinny W8A16 kernel, larger ones the FP8 x FP8 GEMM.
# At decode sizes the GEMM is bound by the weight's bytes, which the skinny kernel reads once and
# nothing else; `_scaled_mm` adds an activation-quantize kernel and runs far below the HBM limit
# there (docs/benchmarks.md). Measured on the H200 (`python -m meshserve.bench.linear_floor
# --compare-fp8`, Llama-3.1-8B shape, 2026-12-04): the skinny kernel is 2.1-2.3x faster than
# `_scaled_mm` up to 16 rows, 1.69x at 32 and still 1.37x at 64 (where bf16 itself is faster).
SKINNY_MAX_M = 64


def quantize_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (w8, scale [..., out, 1] float32) with |w8| <= FP8_MAX in each row
    (a stack of matrices, e.g. MoE experts [E, out, in], gets one scale per row of each)."""
    scale = (w.abs().amax(dim=-1, keepdim=True).float() / FP8_MAX).clamp(min=_MIN_SCALE)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_per_token(x: torch.Tensor, ub: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization: x [M, K] -> (x8, scale [M, 1] float32). `ub` caps the
    row maximum (fbgemm's activation_scale_ub): larger values saturate at FP8_MAX."""
    amax = x.abs().amax(dim=1, keepdim=True).float()
    if ub is not None:
        amax = amax.clamp(max=ub)
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] -> (w8, scale [ceil(out/bn), ceil(in/bk)] float32), one scale per block."""
    bn, bk = block
    out, inp = w.shape
    rows, cols = -(-out // bn), -(-inp // bk)
    padded = F.pad(w.float(), (0, cols * bk - inp, 0, rows * bn - out))
    blocks = padded.view(rows, bn, cols, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=_MIN_SCALE)
    w8 = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(rows * bn, cols * bk)[:out, :inp]
    return w8.to(FP8), scale


def dequantize(w8: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None = None) -> torch.Tensor:
    """The real weight (float32) of w8 and its per-channel ([out, 1]) or per-block scale."""
    if block is None:
        return w8.float() * scale
    out, inp = w8.shape
    full = scale.repeat_interleave(block[0], dim=0)[:out].repeat_interleave(block[1], dim=1)[:, :inp]
    return w8.float() * full


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def gemm_path(device: torch.device, *, block: tuple[int, int] | None, dtype: torch.dtype, in_features: int,
              out_features: int) -> str:
    """The GEMM path of an FP8 layer on `device` (see the module docstring)."""
    if not fp8_supported(device):
        return "dequant"
    if block is not None:
        return "triton_block" if in_features % block[1] == 0 else "dequant"
    # torch._scaled_mm: bfloat16 output with row-wise scales, both matrix sizes multiples of 16.
    aligned = in_features % 16 == 0 and out_features % 16 == 0
    return "scaled_mm" if dtype == torch.bfloat16 and aligned else "dequant"


def fp8_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, *, path: str, bias: torch.Tensor | None,
               block: tuple[int, int] | None = None, input_scale: torch.Tensor | None = None,
               activation_ub: float | None = None) -> torch.Tensor:
    """x [..., in] @ (the real weight).T (+ bias) -> [..., out] in x's dtype."""
    if path == "dequant":
        return F.linear(x, dequantize(w8, scale, block).to(x.dtype), bias)
    if x.numel() // x.shape[-1] <= SKINNY_MAX_M:
        from meshserve.layers.kernels.skinny_gemm import skinny_linear

        return skinny_linear(x, w8, scale, bias, block)
    if path == "triton_block":
        from meshserve.layers.kernels.fp8_gemm import block_fp8_linear

        return block_fp8_linear(x, w8, scale, block, bias, activation_ub)
    return scaled_mm_linear(x, w8, scale, bias=bias, input_scale=input_scale, activation_ub=activation_ub)


def scaled_mm_linear(x: torch.Tensor, w8: torch.Tensor, scale: torch.Tensor, *, bias: torch.Tensor | None,
                     input_scale: torch.Tensor | None = None, activation_ub: float | None = None) -> torch.Tensor:
    """The `scaled_mm` path at any row count: x quantized per token (or with the static
    `input_scale`), then torch._scaled_mm with row-wise scales."""
    lead, k = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, k)
    if input_scale is None:
        x8, x_scale = quantize_per_token(x2, activation_ub)
    else:  # static per-tensor scale, widened to the row-wise form _scaled_mm takes with row-wise weights
        x8 = (x2.float() / input_scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
        x_scale = input_scale.float().reshape(1, 1).expand(x2.shape[0], 1).contiguous()
    out = torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=scale.view(1, -1), bias=bias, out_dtype=x.dtype)
    return out.reshape(*lead, w8.shape[0])
