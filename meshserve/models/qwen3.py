"""Qwen3 (dense): the Llama block plus an RMSNorm over each query and key head before rotary."""

from __future__ import annotations

import torch
from transformers import PretrainedConfig

from meshserve.cluster.comm import RankGroup
from meshserve.config.quantization import Fp8Scheme
from meshserve.layers.norm import RMSNorm
from meshserve.layers.rotary import RotaryEmbedding
from meshserve.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: PretrainedConfig, layer_id: int, rotary: RotaryEmbedding,
                 dtype: torch.dtype, tp: RankGroup, quant: Fp8Scheme | None = None) -> None:
        super().__init__(config, layer_id, rotary, dtype, tp, quant)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, dtype=dtype)

    def project_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
