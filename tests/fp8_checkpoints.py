"""Tiny FP8 checkpoints of each layout meshserve reads, made from a tiny random model, and the
same model with the FP8 weights dequantized written as a plain checkpoint (what transformers
loads as the reference).

The quantization here is written independently of meshserve.layers.fp8 (explicit loops over
rows and blocks), so a bug in meshserve's dequantization or scale sharding cannot hide on both
sides of a comparison.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# The linear layers an FP8 checkpoint quantizes: attention (DeepSeek's MLA projections too), MLPs,
# shared experts and routed experts (Mixtral's w1/w3/w2); routers (`mlp.gate`) stay high precision.
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q_a_proj", "q_b_proj",
           "kv_a_proj_with_mqa", "kv_b_proj", "w1", "w3", "w2")


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout: how weights are scaled and what quantization_config says."""

    name: str
    granularity: str  # "tensor" | "channel" | "block"
    quantization_config: dict
    block: tuple[int, int] | None = None
    scale_name: str = "weight_scale"
    static_input_scale: bool = False
    keep: tuple[str, ...] = field(default=())  # module names written in high precision


def _fbgemm() -> Layout:
    # As Llama-3.1-405B-Instruct-FP8: per-channel weights; layer 0's attention kept in bf16.
    keep = tuple(f"model.layers.0.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    return Layout("fbgemm_fp8", "channel", {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                                            "modules_to_not_convert": [*keep, "lm_head"]}, keep=keep)


def _compressed_tensors(strategy: str) -> Layout:
    static = strategy == "tensor"
    inputs = ({"num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "tensor"} if static
              else {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": True, "strategy": "token"})
    config = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
              "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": inputs,
                                            "weights": {"num_bits": 8, "type": "float", "symmetric": True,
                                                        "dynamic": False, "strategy": strategy}}},
              "ignore": ["lm_head", r"re:model\.layers\.1\.mlp\.down_proj"]}
    return Layout(f"compressed-tensors-{strategy}", strategy, config, static_input_scale=static,
                  keep=("model.layers.1.mlp.down_proj",))


def _block(size: int) -> Layout:
    # DeepSeek-V3's layout with a block small enough for the tiny model's 16-wide shards.
    return Layout(f"block-{size}", "block", {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [size, size]},
                  block=(size, size), scale_name="weight_scale_inv")


LAYOUTS = {layout.name: layout for layout in
           (_fbgemm(), _compressed_tensors("tensor"), _compressed_tensors("channel"), _block(16))}


def _quantize(w: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp8 weight, scale as the checkpoint stores it, dequantized float32 weight)."""
    out, inp = w.shape
    if layout.granularity == "tensor":
        scales = torch.full((out, inp), float(w.abs().max()) / FP8_MAX)
        stored = scales[:1, 0].clone()  # shape [1]
    elif layout.granularity == "channel":
        scales = torch.empty(out, inp)
        for r in range(out):
            scales[r] = float(w[r].abs().max()) / FP8_MAX
        stored = scales[:, :1].clone()  # [out, 1]
    else:
        bn, bk = layout.block
        stored = torch.empty(-(-out // bn), -(-inp // bk))
        scales = torch.empty(out, inp)
        for i in range(stored.shape[0]):
            for j in range(stored.shape[1]):
                tile = w[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
                stored[i, j] = float(tile.abs().max()) / FP8_MAX
                scales[i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = stored[i, j]
    w8 = (w / scales).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return w8, stored.float(), w8.float() * scales


def make_fp8_checkpoint(src: Path, fp8_dir: Path, dequant_dir: Path, layout: Layout) -> tuple[Path, Path]:
    """From the float32 model in `src`: `fp8_dir` (FP8 linears + quantization_config) and
    `dequant_dir` (the same model with those weights dequantized, no quantization_config)."""
    for d in (fp8_dir, dequant_dir):
        shutil.copytree(src, d, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    fp8_tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                module = name.removesuffix(".weight")
                if name.endswith(".weight") and module.split(".")[-1] in LINEARS and module not in layout.keep:
                    w8, scale, dequant = _quantize(tensor, layout)
                    fp8_tensors[name], fp8_tensors[f"{module}.{layout.scale_name}"] = w8, scale
                    if layout.static_input_scale:  # any positive scale: the CPU path does not use it
                        fp8_tensors[f"{module}.input_scale"] = torch.tensor([0.05 + 0.01 * len(fp8_tensors)])
                    plain[name] = dequant
                else:
                    fp8_tensors[name] = plain[name] = tensor
    save_file(fp8_tensors, str(fp8_dir / "model.safetensors"))
    save_file(plain, str(dequant_dir / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = layout.quantization_config
    (fp8_dir / "config.json").write_text(json.dumps(config, indent=2))
    return fp8_dir, dequant_dir


# What `--quantization fp8` does to a plain checkpoint on one rank: every linear layer per channel.
ONLINE = Layout("online-fp8", "channel", {"quant_method": "fbgemm_fp8"})


def _round_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """What an FP8 KV cache gives back for x: fp8(clamp(x / scale)) * scale."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).to(x.dtype) * scale


def hf_greedy_fp8_kv(model_dir: Path, prompts: list[list[int]], new_tokens: int,
                     scales: dict[int, tuple[float, float]] | None = None) -> list[list[int]]:
    """transformers' greedy output with every key and value (after rotary) rounded as an FP8 KV
    cache stores them, with per-layer (K, V) `scales` (default 1.0): an attention function that
    rounds its keys and values, then runs transformers' own SDPA attention."""
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from tests.hf_reference import _for_reference, greedy_generate

    def attention(module, query, key, value, attention_mask, **kwargs):
        k_scale, v_scale = (scales or {}).get(module.layer_idx, (1.0, 1.0))
        return sdpa_attention_forward(module, query, _round_kv(key, k_scale), _round_kv(value, v_scale),
                                      attention_mask, **kwargs)

    AttentionInterface.register("meshserve_fp8_kv", attention)
    model = _for_reference(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                                attn_implementation="meshserve_fp8_kv"))
    return greedy_generate(model, prompts, new_tokens)


def with_kv_scales(src: Path, dst: Path, scales: dict[int, tuple[float, float]]) -> Path:
    """A copy of `src` whose checkpoint also carries per-layer `self_attn.k_proj.k_scale` /
    `v_proj.v_scale` (compressed-tensors' kv_cache_scheme names)."""
    shutil.copytree(src, dst)
    with safe_open(str(dst / "model.safetensors"), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    for layer, (k, v) in scales.items():
        tensors[f"model.layers.{layer}.self_attn.k_proj.k_scale"] = torch.tensor(k)
        tensors[f"model.layers.{layer}.self_attn.v_proj.v_scale"] = torch.tensor(v)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def online_dequantized(src: Path, dst: Path, tp: int) -> Path:
    """What `--quantization fp8 --tp <tp>` computes with, as a plain checkpoint: each rank
    quantizes its own shard per output row, so the row-parallel projections (o_proj, down_proj, experts' w2:
    input columns split over ranks) get one scale per (row, rank's column range)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json"))
    channel = Layout("per-channel", "channel", {})
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                projection = name.removesuffix(".weight").split(".")[-1]
                if not name.endswith(".weight") or projection not in LINEARS:
                    tensors[name] = tensor
                    continue
                parts = tensor.chunk(tp, dim=1) if projection in ("o_proj", "down_proj", "w2") else [tensor]
                tensors[name] = torch.cat([_quantize(part, channel)[2] for part in parts], dim=1)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst
