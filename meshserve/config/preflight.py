"""Checks of a model directory against the command line that need neither torch nor transformers.

``launch_server`` runs :func:`check_model_dir` right after parsing the arguments, so a typo in
``--model-path``, an architecture meshserve cannot run, or a ``--tp`` the model's heads cannot be
split over is reported within a second or two -- not after importing torch (seconds), loading
transformers (seconds) or spawning ``--tp`` ranks that would then fail one by one (minutes).
config.json is read as plain JSON for that reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from meshserve.cluster.layout import KVHeadShare

# Architectures the executor can run. meshserve.models.registry maps each to its implementation;
# the list lives here, torch-free, so the check above needs no torch (a unit test keeps the two equal).
SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
)


class ModelDirError(ValueError):
    """The model directory cannot be served with these arguments; the message says why."""


@dataclass(frozen=True)
class ModelShape:
    """The parts of config.json that decide whether and how the model shards over ``--tp``."""

    architecture: str
    num_heads: int
    num_kv_heads: int  # 1 for latent attention (MLA): one latent head, replicated on every rank
    intermediate_size: int
    num_experts: int = 0  # routed experts per MoE layer (0: dense)
    moe_intermediate_size: int = 0

    def tp_problems(self, tp: int, attn_tp: int | None = None, ep: int = 1) -> list[str]:
        """Why the model cannot be split over ``tp`` ranks, with attention over ``attn_tp`` of
        them (tp / dp under --enable-dp-attention; default tp) — empty when it can.

        Query heads split evenly over the attention-TP group; KV heads follow the one rule of
        meshserve.cluster.layout.KVHeadShare (split, or replicated evenly when fewer). The
        MLP's intermediate size is split evenly over tp. The vocabulary never blocks: the
        embedding and LM head pad it to a multiple of their group's size.
        """
        attn_tp = tp if attn_tp is None else attn_tp
        over = f"--tp {tp}" if attn_tp == tp else f"the attention tensor-parallel size {attn_tp} (--tp / --dp-size)"
        problems = []
        if self.num_heads % attn_tp:
            problems.append(f"{self.num_heads} attention heads do not divide over {over}")
        kv_problem = KVHeadShare(self.num_kv_heads, attn_tp).problem(over)
        if kv_problem is not None:
            problems.append(kv_problem)
        if self.intermediate_size % tp:
            problems.append(f"MLP intermediate size {self.intermediate_size} does not divide over --tp {tp}")
        # Routed experts spread over --ep ranks, each split over the MoE tensor-parallel size tp / ep.
        if self.num_experts and self.num_experts % ep:
            problems.append(f"{self.num_experts} routed experts do not divide over --ep {ep}")
        if self.num_experts and self.moe_intermediate_size % (tp // ep):
            problems.append(f"MoE intermediate size {self.moe_intermediate_size} does not divide over the MoE "
                            f"tensor-parallel size {tp // ep} (--tp / --ep)")
        return problems


def read_model_shape(model_path: str) -> ModelShape:
    """Read config.json of a local model directory; refuse what meshserve cannot load."""
    path = Path(model_path)
    config_file = path / "config.json"
    if not config_file.is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise ModelDirError(
            f"--model-path {model_path!r} {what}; it must be a local Hugging Face model directory "
            "(meshserve never downloads from a model hub)"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelDirError(f"cannot read {config_file}: {err}") from None
    if not isinstance(config, dict):
        raise ModelDirError(f"{config_file} is not a JSON object")
    architectures = config.get("architectures") or []
    arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ModelDirError(
            f"architecture {architectures} in {config_file} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        num_heads = int(config["num_attention_heads"])
        experts = int(config.get("num_local_experts") or config.get("num_experts") or config.get("n_routed_experts") or 0)
        return ModelShape(
            architecture=arch,
            num_heads=num_heads,
            num_kv_heads=1 if config.get("kv_lora_rank") else int(config.get("num_key_value_heads") or num_heads),
            intermediate_size=int(config["intermediate_size"]),
            num_experts=experts,
            # Mixtral's experts are intermediate_size wide; the others name their own width.
            moe_intermediate_size=int(config.get("moe_intermediate_size") or config["intermediate_size"]) if experts else 0,
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ModelDirError(f"{config_file} lacks a valid {err} for a {arch}") from None


def check_model_dir(model_path: str, tp: int, attn_tp: int | None = None, ep: int = 1) -> ModelShape:
    """:func:`read_model_shape`, then refuse a ``tp`` (``ep``) the model cannot be split over."""
    shape = read_model_shape(model_path)
    problems = shape.tp_problems(tp, attn_tp, ep)
    if problems:
        raise ModelDirError(f"{model_path} cannot run with --tp {tp}: " + "; ".join(problems))
    return shape
