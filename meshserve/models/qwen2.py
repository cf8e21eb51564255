"""Qwen2: the Llama block with biased q/k/v projections and an unbiased output projection."""

from __future__ import annotations

from transformers import PretrainedConfig

from meshserve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen2Attention(LlamaAttention):
    @staticmethod
    def qkv_bias(config: PretrainedConfig) -> bool:
        return True

    @staticmethod
    def o_bias(config: PretrainedConfig) -> bool:
        return False


class Qwen2DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen2Attention


class Qwen2ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen2DecoderLayer
