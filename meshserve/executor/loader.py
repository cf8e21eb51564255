"""Build a model from a Hugging Face directory: construct on the target device, then stream the
safetensors checkpoint (single file or sharded index) through each parameter's weight_loader."""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from meshserve.cluster.groups import ParallelGroups
from meshserve.config.model_config import ModelConfig
from meshserve.config.quantization import Fp8Scheme
from meshserve.layers.fp8 import FP8
from meshserve.layers.linear import ParallelLinear
from meshserve.layers.moe.experts import FusedExperts
from meshserve.models.registry import MODEL_REGISTRY

logger = logging.getLogger("meshserve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def checkpoint_files(model_path: str) -> list[Path]:
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [root / shard for shard in shards]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors weights in {model_path}")
    return files


def iter_checkpoint(model_path: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = checkpoint_files(model_path)
    for number, file in enumerate(files, 1):
        logger.info("loading weights (%d/%d): %s", number, len(files), file.name)
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _replicated_weight_loader(param: torch.nn.Parameter, loaded: torch.Tensor) -> None:
    """Parameters that every rank holds whole (norms)."""
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
    param.data.copy_(loaded)


# Checkpoint spellings of a layer's FP8 tensors -> meshserve's parameter names (DeepSeek calls its
# block scales `weight_scale_inv`; they multiply the weight like every other scale).
_SCALE_ALIASES = {".weight_scale_inv": ".weight_scale"}
# Per-layer KV cache scales (compressed-tensors' kv_cache_scheme, ModelOpt, vLLM exports):
# `model.layers.N.self_attn[.k_proj|.attn].k_scale` and v_scale. The KV pool uses them.
_KV_SCALE = re.compile(r"layers\.(\d+)\.self_attn\.(?:[a-z_]+\.)?([kv])_scale$")


def load_model(model_config: ModelConfig, *, device: torch.device, groups: ParallelGroups,
               dummy: bool = False) -> nn.Module:
    """The model with its checkpoint's weights, or with `dummy` (--load-format dummy) small
    random ones: the same parameters, kernels and memory, without reading a checkpoint."""
    dtype = DTYPES[model_config.dtype]
    model_cls = MODEL_REGISTRY[model_config.architecture]
    quant = model_config.quantization
    with torch.device(device):
        model = model_cls(model_config.hf_config, dtype=dtype, groups=groups, max_positions=model_config.context_length,
                          quant=quant)
    model.kv_scales = {}  # layer -> {"k": scale, "v": scale}, from the checkpoint (KVPool scales)
    if dummy:
        _fill_dummy(model)
    else:
        _load_checkpoint(model, model_config, device)
    for module in model.modules():
        if isinstance(module, (ParallelLinear, FusedExperts)):
            module.finish_loading()
    if quant is not None and quant.online and device.type == "cuda":
        torch.cuda.empty_cache()  # the high-precision weights just replaced: the KV cache sizing sees free memory
    logger.info("%s %s (%s, %s) on %s", "random (--load-format dummy)" if dummy else "loaded",
                model_config.architecture, model_config.model_path, model_config.dtype, device)
    if quant is not None:
        _log_fp8(model, quant, dtype)
    return model.eval()


def _fill_dummy(model: nn.Module) -> None:
    """Every parameter drawn from U(-1e-3, 1e-3) (a fixed seed, so every rank and run draws the
    same); FP8 weights from U(-1, 1) with their scales at 1e-3, so they dequantize to the same
    range. Activations stay small and finite through any depth."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)
    for name, param in model.named_parameters():
        if param.dtype == FP8:
            values = torch.empty(param.shape, device=param.device, dtype=torch.bfloat16).uniform_(-1, 1, generator=gen)
            param.data.copy_(values.to(FP8))
        elif name.endswith(("weight_scale", "w13_scale", "w2_scale")):  # linear layers', experts' scales
            param.data.fill_(1e-3)
        elif name.endswith("input_scale"):
            param.data.fill_(1.0)
        else:
            param.data.uniform_(-1e-3, 1e-3, generator=gen)


def _load_checkpoint(model: nn.Module, model_config: ModelConfig, device: torch.device) -> None:
    model_cls = type(model)
    quant = model_config.quantization
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for ckpt_name, tensor in iter_checkpoint(model_config.model_path):
        kv_scale = _KV_SCALE.search(ckpt_name)
        if kv_scale is not None:
            model.kv_scales.setdefault(int(kv_scale.group(1)), {})[kv_scale.group(2)] = float(tensor.reshape(()))
            continue
        for alias, name in _SCALE_ALIASES.items():
            if ckpt_name.endswith(alias):
                ckpt_name = ckpt_name.removesuffix(alias) + name
        target = model.checkpoint_name_to_param(ckpt_name)
        if target is None:
            continue
        name, shard_id, *expert_id = target  # expert_id: one expert's projection (MoE), else absent
        param = params.get(name)
        if param is None:
            hint = " (a quantization tensor of a layer the quantization config keeps in high precision?)" \
                if quant is not None and "_scale" in ckpt_name else ""
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has no place in {model_cls.__name__}{hint}")
        if (tensor.dtype == FP8) != (param.dtype == FP8):
            raise ValueError(f"checkpoint tensor {ckpt_name!r} is {tensor.dtype} but its layer holds {param.dtype}: "
                             "the checkpoint's quantization_config does not describe it")
        # Each tensor takes its parameter's dtype: the model's, except parameters a model keeps in
        # float32 whatever it runs in (DeepSeek-V3's e_score_correction_bias, FP8 weights' scales).
        tensor = tensor.to(device=device, dtype=param.dtype)
        loader = getattr(param, "weight_loader", _replicated_weight_loader)
        try:
            loader(param, tensor, *([] if shard_id is None else [shard_id]), *expert_id)
        except ValueError as err:
            raise ValueError(f"checkpoint tensor {ckpt_name!r}: {err}") from None
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_config.model_path} lacks weights for: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    for module in model.modules():
        if isinstance(module, FusedExperts):
            module.check_loaded()


def _log_fp8(model: nn.Module, quant: Fp8Scheme, dtype: torch.dtype) -> None:
    """Which layers are FP8 and which GEMM path they run (layers/fp8.py describes the paths)."""
    linears = [m for m in model.modules() if isinstance(m, ParallelLinear)]
    paths = Counter(m.gemm_path for m in linears if m.fp8 is not None)
    kept = sum(m.fp8 is None for m in linears)
    experts = [m for m in model.modules() if isinstance(m, FusedExperts)]
    fp8_experts = sum(m.w13_scale is not None for m in experts)
    logger.info("FP8: %s; %s; %d linear layers kept in high precision%s", quant.describe(),
                ", ".join(f"{n} layers on the {path} GEMM path" for path, n in sorted(paths.items())), kept,
                f"; {fp8_experts} of {len(experts)} MoE expert layers FP8 (W8A16: activations stay {dtype})"
                if experts else "")
    if "dequant" in paths and any(p.device.type == "cuda" for p in model.parameters()):
        logger.warning("FP8 on CUDA through dequantize + %s GEMM: correct but slow (a GPU without FP8 tensor "
                       "cores, per-channel scales in a model that is not bfloat16, or block-wise layers whose "
                       "input is not whole blocks)", dtype)
