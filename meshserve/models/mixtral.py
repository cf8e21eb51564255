"""Mixtral: the Llama block with a sparse MoE MLP in every layer (softmax top-k, renormalised)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from meshserve.cluster.groups import ParallelGroups
from meshserve.config.quantization import Fp8Scheme
from meshserve.layers.moe.layer import SparseMoeBlock
from meshserve.layers.moe.router import Routing
from meshserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class MixtralDecoderLayer(LlamaDecoderLayer):
    @staticmethod
    def make_mlp(config: PretrainedConfig, layer_id: int, dtype: torch.dtype, groups: ParallelGroups,
                 quant: Fp8Scheme | None) -> nn.Module:
        if config.hidden_act != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported (only silu)")
        routing = Routing(num_experts=config.num_local_experts, top_k=config.num_experts_per_tok, renormalize=True)
        return SparseMoeBlock(config.hidden_size, config.intermediate_size, routing, dtype=dtype, groups=groups,
                              quant=quant, prefix=f"model.layers.{layer_id}.block_sparse_moe")


class MixtralForCausalLM(LlamaForCausalLM):
    layer_cls = MixtralDecoderLayer
    renamed_modules = (("block_sparse_moe", "mlp"),)
