"""Qwen2-MoE and Qwen3-MoE: the Qwen2 / Qwen3 attention with sparse MoE MLPs (softmax top-k,
renormalised when `norm_topk_prob`). Which layers are sparse: every `decoder_sparse_step`-th,
except those in `mlp_only_layers` (dense, `intermediate_size`). Qwen2-MoE adds one shared expert
whose output is scaled by sigmoid(shared_expert_gate . x)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from meshserve.cluster.groups import ParallelGroups
from meshserve.config.quantization import Fp8Scheme
from meshserve.layers.moe.layer import SparseMoeBlock
from meshserve.layers.moe.router import Routing
from meshserve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, mlp_prefix
from meshserve.models.qwen3 import Qwen3Attention


def is_sparse_layer(config: PretrainedConfig, layer_id: int) -> bool:
    return (layer_id not in (getattr(config, "mlp_only_layers", None) or [])
            and config.num_experts > 0 and (layer_id + 1) % config.decoder_sparse_step == 0)


def _refuse_sliding_window(config: PretrainedConfig) -> None:
    if getattr(config, "use_sliding_window", False):
        raise ValueError("sliding-window attention (use_sliding_window) is not supported")


def _moe_mlp(config: PretrainedConfig, layer_id: int, dtype: torch.dtype, groups: ParallelGroups,
             quant: Fp8Scheme | None, shared_expert: bool) -> nn.Module:
    prefix = mlp_prefix(layer_id)
    if not is_sparse_layer(config, layer_id):
        return LlamaMLP(config, dtype, groups.tp, quant=quant, prefix=prefix)
    if config.hidden_act != "silu":
        raise ValueError(f"activation {config.hidden_act!r} is not supported (only silu)")
    routing = Routing(num_experts=config.num_experts, top_k=config.num_experts_per_tok,
                      renormalize=bool(config.norm_topk_prob))
    shared = LlamaMLP(config, dtype, groups.tp, intermediate_size=config.shared_expert_intermediate_size,
                      quant=quant, prefix=f"{prefix}.shared_expert") if shared_expert else None
    return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, routing, dtype=dtype, groups=groups,
                          shared=shared, shared_gate=shared_expert, quant=quant, prefix=prefix)


class Qwen2MoeAttention(LlamaAttention):
    @staticmethod
    def qkv_bias(config: PretrainedConfig) -> bool:
        return bool(getattr(config, "qkv_bias", True))

    @staticmethod
    def o_bias(config: PretrainedConfig) -> bool:
        return False


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2MoeAttention

    @staticmethod
    def make_mlp(config: PretrainedConfig, layer_id: int, dtype: torch.dtype, groups: ParallelGroups,
                 quant: Fp8Scheme | None) -> nn.Module:
        _refuse_sliding_window(config)
        return _moe_mlp(config, layer_id, dtype, groups, quant, shared_expert=True)


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2MoeDecoderLayer
    renamed_modules = (("shared_expert", "shared"),)


class Qwen3MoeDecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention

    @staticmethod
    def make_mlp(config: PretrainedConfig, layer_id: int, dtype: torch.dtype, groups: ParallelGroups,
                 quant: Fp8Scheme | None) -> nn.Module:
        _refuse_sliding_window(config)
        return _moe_mlp(config, layer_id, dtype, groups, quant, shared_expert=False)


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer
