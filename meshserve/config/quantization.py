"""Which FP8 scheme a model's linear layers use, resolved once from config.json's
`quantization_config` and `--quantization` (torch-free: the tokenizer side imports it too).

Checkpoint layouts read (field names as transformers, vLLM and SGLang read them):

* `fbgemm_fp8` (Llama-3.1-405B-Instruct-FP8): FP8 `weight` [out, in] with a per-channel
  `weight_scale` [out, 1]; activations quantized per token at run time, their scale capped by
  `activation_scale_ub`; `modules_to_not_convert` lists the modules kept in high precision.
* `compressed-tensors` with `format: float-quantized`: one config group targeting `Linear`
  whose `weights` are 8-bit floats with `strategy` `tensor` (scalar `weight_scale`) or `channel`
  ([out, 1]); `input_activations` absent (weight only), dynamic per token, or static per tensor
  (an `input_scale` tensor); `ignore` lists module names or `re:` patterns.
* `fp8` (DeepSeek-V3/R1, and per-tensor FP8 checkpoints): with `weight_block_size` [bn, bk]
  the weight has one `weight_scale_inv` per bn x bk block ([ceil(out/bn), ceil(in/bk)]);
  without it a scalar `weight_scale` (+ `input_scale` when `activation_scheme` is static).
  `ignored_layers` / `modules_to_not_convert` list modules kept in high precision.

Every scale MULTIPLIES the stored FP8 value (DeepSeek's `weight_scale_inv` included, despite
its name): real weight = fp8 * scale. Anything else is refused by name at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

# `--quantization` values that meshserve serves: quantize a high-precision checkpoint to FP8 at
# load (`fp8`), or name the method of an FP8 checkpoint (which is detected anyway).
SERVED_QUANTIZATION = ("fp8", "fbgemm_fp8", "compressed-tensors")

Granularity = Literal["tensor", "channel", "block"]


class QuantizationError(ValueError):
    """The checkpoint's or the command line's quantization cannot be served; says which."""


@dataclass(frozen=True)
class Fp8Scheme:
    """FP8 (e4m3) weights of every linear layer not in `skip`.

    `granularity` is how the CHECKPOINT scales its weights; per-tensor scales are widened to one
    per output row at load (exact: the same number repeated), so the layers only know "channel"
    and "block". `online` means the checkpoint is high precision and the weights are quantized
    per channel while loading (`--quantization fp8`)."""

    method: str  # the quant_method, or "fp8" for --quantization fp8 on a plain checkpoint
    granularity: Granularity
    block: tuple[int, int] | None = None  # (rows, columns) of a scale block; granularity "block"
    static_input_scale: bool = False  # the checkpoint carries a per-tensor `input_scale`
    activation_scale_ub: float | None = None  # cap of a dynamic per-token activation scale
    skip: tuple[str, ...] = ()  # module names (or `re:` patterns) kept in high precision
    online: bool = False

    def applies_to(self, module_names: Sequence[str]) -> bool:
        """Whether the linear layer holding the checkpoint modules `module_names` (one, or the
        parts a fused layer concatenates) is FP8. The parts of one fused layer must agree."""
        skipped = [self._skipped(name) for name in module_names]
        if any(skipped) and not all(skipped):
            raise QuantizationError(
                f"the quantization config keeps {', '.join(n for n, s in zip(module_names, skipped) if s)} in high "
                f"precision but not {', '.join(n for n, s in zip(module_names, skipped) if not s)}; meshserve fuses "
                "them into one matrix, so they must agree")
        return not skipped[0]

    def _skipped(self, name: str) -> bool:
        for entry in self.skip:
            if entry.startswith("re:"):
                if re.match(entry[3:], name):
                    return True
            elif f".{entry}." in f".{name}.":  # whole dotted components, anywhere in the name
                return True
        return False

    def describe(self) -> str:
        if self.online:
            return "fp8 (quantized at load: per-channel weights, dynamic per-token activations)"
        detail = f"{self.block[0]}x{self.block[1]} blocks" if self.block else f"per-{self.granularity} weights"
        acts = "static activation scale" if self.static_input_scale else "dynamic activation scales"
        return f"{self.method} ({detail}, {acts})"


def resolve_quantization(quantization_config: Mapping[str, Any] | None, requested: str | None) -> Fp8Scheme | None:
    """The scheme for a checkpoint whose config.json has `quantization_config` (None when it has
    none), served with `--quantization requested` (None when not given)."""
    if quantization_config is None:
        if requested is None:
            return None
        if requested != "fp8":
            raise QuantizationError(f"--quantization {requested} names a checkpoint format, but the checkpoint has no "
                                    "quantization_config; use --quantization fp8 to quantize it at load")
        return Fp8Scheme(method="fp8", granularity="channel", online=True)
    config = dict(quantization_config)
    method = config.get("quant_method")
    parser = _PARSERS.get(method)
    if parser is None:
        raise QuantizationError(f"quantization_config quant_method {method!r} is not supported; meshserve serves "
                                f"FP8 checkpoints: {', '.join(sorted(_PARSERS))}")
    if requested is not None and requested != method:
        raise QuantizationError(f"--quantization {requested} contradicts the checkpoint's quant_method {method!r}; "
                                "leave --quantization out (FP8 checkpoints are detected)")
    return parser(config)


def _fbgemm(config: dict[str, Any]) -> Fp8Scheme:
    ub = config.get("activation_scale_ub")
    return Fp8Scheme(method="fbgemm_fp8", granularity="channel",
                     activation_scale_ub=None if ub is None else float(ub),
                     skip=tuple(config.get("modules_to_not_convert") or ()))


def _fp8(config: dict[str, Any]) -> Fp8Scheme:
    fmt = config.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise QuantizationError(f"fp8 checkpoint format {fmt!r} is not supported (only e4m3)")
    activation = config.get("activation_scheme", "dynamic")
    if activation not in ("dynamic", "static"):
        raise QuantizationError(f"fp8 activation_scheme {activation!r} is not supported (dynamic or static)")
    skip = tuple(config.get("ignored_layers") or config.get("modules_to_not_convert") or ())
    block = config.get("weight_block_size")
    if block is None:
        return Fp8Scheme(method="fp8", granularity="tensor", static_input_scale=activation == "static", skip=skip)
    if len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
        raise QuantizationError(f"fp8 weight_block_size {block!r} is not two positive integers")
    if activation != "dynamic":
        raise QuantizationError("block-wise fp8 with activation_scheme static is not supported (DeepSeek's is dynamic)")
    return Fp8Scheme(method="fp8", granularity="block", block=(block[0], block[1]), skip=skip)


def _compressed_tensors(config: dict[str, Any]) -> Fp8Scheme:
    fmt = config.get("format")
    if fmt != "float-quantized":
        raise QuantizationError(f"compressed-tensors format {fmt!r} is not supported (only float-quantized: FP8)")
    groups = list((config.get("config_groups") or {}).values())
    if len(groups) != 1 or "Linear" not in (groups[0].get("targets") or []):
        raise QuantizationError("compressed-tensors: only one config group targeting Linear is supported, "
                                f"got {len(groups)} group(s)")
    weights, inputs = groups[0].get("weights") or {}, groups[0].get("input_activations")
    if weights.get("type") != "float" or weights.get("num_bits") != 8 or weights.get("dynamic", False):
        raise QuantizationError(f"compressed-tensors weights {weights} are not static 8-bit floats")
    strategy = weights.get("strategy")
    if strategy not in ("tensor", "channel"):
        raise QuantizationError(f"compressed-tensors weight strategy {strategy!r} is not supported (tensor, channel)")
    static_input = False
    if inputs is not None:
        if inputs.get("type") != "float" or inputs.get("num_bits") != 8:
            raise QuantizationError(f"compressed-tensors input_activations {inputs} are not 8-bit floats")
        if inputs.get("dynamic"):
            if inputs.get("strategy") not in ("token", None):
                raise QuantizationError(f"compressed-tensors dynamic activation strategy {inputs.get('strategy')!r} "
                                        "is not supported (token)")
        elif inputs.get("strategy") == "tensor":
            static_input = True
        else:
            raise QuantizationError(f"compressed-tensors static activation strategy {inputs.get('strategy')!r} "
                                    "is not supported (tensor)")
    return Fp8Scheme(method="compressed-tensors", granularity=strategy, static_input_scale=static_input,
                     skip=tuple(config.get("ignore") or ()))


_PARSERS = {"fbgemm_fp8": _fbgemm, "fp8": _fp8, "compressed-tensors": _compressed_tensors}
