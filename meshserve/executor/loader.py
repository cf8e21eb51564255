"""Build a model from a Hugging Face directory: construct on the target device, then stream the
safetensors checkpoint (single file or sharded index) through each parameter's weight_loader."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from meshserve.cluster.comm import TensorParallelGroup
from meshserve.config.model_config import ModelConfig
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


def load_model(model_config: ModelConfig, *, device: torch.device, tp: TensorParallelGroup) -> nn.Module:
    dtype = DTYPES[model_config.dtype]
    model_cls = MODEL_REGISTRY[model_config.architecture]
    with torch.device(device):
        model = model_cls(model_config.hf_config, dtype=dtype, tp=tp, max_positions=model_config.context_length)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for ckpt_name, tensor in iter_checkpoint(model_config.model_path):
        target = model.checkpoint_name_to_param(ckpt_name)
        if target is None:
            continue
        name, shard_id, *expert_id = target  # expert_id: one expert's projection (MoE), else absent
        param = params.get(name)
        if param is None:
            raise ValueError(f"checkpoint tensor {ckpt_name!r} has no place in {model_cls.__name__}")
        # Each tensor takes its parameter's dtype: the model's, except parameters a model keeps in
        # float32 whatever it runs in (DeepSeek-V3's e_score_correction_bias).
        tensor = tensor.to(device=device, dtype=param.dtype)
        loader = getattr(param, "weight_loader", _replicated_weight_loader)
        loader(param, tensor, *([] if shard_id is None else [shard_id]), *expert_id)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"checkpoint {model_config.model_path} lacks weights for: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    logger.info("loaded %s (%s, %s) on %s", model_config.architecture, model_config.model_path, model_config.dtype, device)
    return model.eval()
