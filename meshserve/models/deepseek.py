"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and MoE MLPs with shared
experts, after `first_k_dense_replace` dense layers.

MLA. Each token's keys and values are compressed into a latent c_kv (kv_lora_rank wide, after
kv_a_layernorm) plus one rope key k_rope (qk_rope_head_dim) shared by all heads; per head,
k_nope = W_UK c_kv and v = W_UV c_kv (the two halves of kv_b_proj). Only [c_kv | k_rope] is
cached (KVPool's latent layout: one "head" of kv_lora_rank + qk_rope_head_dim, values = its first
kv_lora_rank features), 576 values per token and layer for DeepSeek-V3 instead of 128 heads ×
(192 + 128) decompressed.

Attention runs in the absorbed form, in prefill and decode alike: W_UK is folded into the query
(q_lat = q_nope W_UK, per head), so queries [q_lat | q_rope] attend over the cached latent keys
[c_kv | k_rope] as multi-query attention with one KV head; the output (a weighted sum of c_kv)
is brought to the value space by W_UV afterwards. Why: one code path, through the ordinary
paged attention backends, that never decompresses the cache (decompressing it per step would
cost num_heads × (qk_nope + v) values per cached token and step). The price is prefill FLOPs
(scores over kv_lora_rank instead of qk_nope_head_dim per head); a decompressed prefill path is
an optimisation left for the GPU backends.

Rope: applied to the qk_rope_head_dim part only, by the model (the attention layer gets rotated
q and k). DeepSeek's checkpoints lay each rotary pair out interleaved, (x0, x1), (x2, x3), ...
(transformers' `rope_interleave`, DeepSeek-V2's complex rotation); the rope features are
de-interleaved to [evens | odds] and rotated as rotate-half pairs, which gives the same dot
products. YaRN scaling comes with the rotary tables (transformers' initialiser); its mscale
also scales the softmax (scaling × mscale(factor, mscale_all_dim)²), as the reference does.

Routing: DeepSeek-V2 softmax top-k (`greedy`) or group-limited (`group_limited_greedy`);
DeepSeek-V3 sigmoid scores with e_score_correction_bias, grouped top-k (`noaux_tc`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import PretrainedConfig

from meshserve.cluster.comm import RankGroup
from meshserve.cluster.groups import ParallelGroups
from meshserve.config.quantization import Fp8Scheme
from meshserve.executor.forward_batch import ForwardBatch
from meshserve.layers.attention.layer import AttentionLayer
from meshserve.layers.linear import ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, layer_fp8
from meshserve.layers.moe.layer import SparseMoeBlock
from meshserve.layers.moe.router import Routing
from meshserve.layers.norm import RMSNorm
from meshserve.layers.rotary import RotaryEmbedding, rope_parameters
from meshserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, mlp_prefix


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(config: PretrainedConfig) -> float:
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    params = rope_parameters(config)
    if params.get("rope_type", "default") != "default" and params.get("mscale_all_dim"):
        scale *= _yarn_mscale(params["factor"], params["mscale_all_dim"]) ** 2
    return scale


def _deinterleave(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (x0, x2, ..., x1, x3, ...) on the last dimension."""
    return torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)


class DeepseekMLA(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, rotary: RotaryEmbedding,
                 dtype: torch.dtype, tp: RankGroup, quant: Fp8Scheme | None = None) -> None:
        super().__init__()
        if config.num_attention_heads % tp.size:
            raise ValueError(f"{config.num_attention_heads} attention heads do not divide over "
                             f"tensor-parallel size {tp.size}")
        self.num_heads = config.num_attention_heads // tp.size
        self.nope_dim, self.rope_dim = config.qk_nope_head_dim, config.qk_rope_head_dim
        self.v_dim, self.latent_dim = config.v_head_dim, config.kv_lora_rank
        qk_dim = self.nope_dim + self.rope_dim
        heads, bias = config.num_attention_heads, bool(getattr(config, "attention_bias", False))
        prefix = f"model.layers.{layer_id}.self_attn"  # checkpoint module names, which FP8 skip lists name

        def fp8(name: str) -> Fp8Scheme | None:
            return layer_fp8(quant, [f"{prefix}.{name}"])

        self.q_lora_rank = getattr(config, "q_lora_rank", None)
        if self.q_lora_rank is None:
            self.q_proj = ColumnParallelLinear(config.hidden_size, heads * qk_dim, dtype=dtype, tp=tp,
                                               fp8=fp8("q_proj"))
        else:
            self.q_a_proj = ReplicatedLinear(config.hidden_size, self.q_lora_rank, bias=bias, dtype=dtype,
                                             fp8=fp8("q_a_proj"))
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, config.rms_norm_eps, dtype=dtype)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_dim, dtype=dtype, tp=tp,
                                                 fp8=fp8("q_b_proj"))
        self.kv_a_proj_with_mqa = ReplicatedLinear(config.hidden_size, self.latent_dim + self.rope_dim, bias=bias,
                                                   dtype=dtype, fp8=fp8("kv_a_proj_with_mqa"))
        self.kv_a_layernorm = RMSNorm(self.latent_dim, config.rms_norm_eps, dtype=dtype)
        # Per head, rows [W_UK (qk_nope_head_dim) | W_UV (v_head_dim)] over kv_lora_rank columns.
        # Read as a weight (absorbed form, forward), never called: an FP8 checkpoint's kv_b_proj
        # loads FP8 with its block scales cut per rank like any column-parallel layer, and is
        # dequantized to the model's dtype once loaded (dequantize_at_load).
        self.kv_b_proj = ColumnParallelLinear(self.latent_dim, heads * (self.nope_dim + self.v_dim), dtype=dtype, tp=tp,
                                              fp8=fp8("kv_b_proj"), dequantize_at_load=True)
        self.o_proj = RowParallelLinear(heads * self.v_dim, config.hidden_size, bias=bias, dtype=dtype, tp=tp,
                                        fp8=fp8("o_proj"))
        self.rotary = rotary
        self.interleaved = bool(getattr(config, "rope_interleave", True))
        self.attn = AttentionLayer(layer_id, self.num_heads, 1, self.latent_dim + self.rope_dim,
                                   scaling=mla_softmax_scale(config), rotary=None, v_head_dim=self.latent_dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        tokens = x.shape[0]
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(tokens, self.num_heads, -1).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rope = k_rope.view(tokens, 1, self.rope_dim)
        if self.interleaved:
            q_rope, k_rope = _deinterleave(q_rope), _deinterleave(k_rope)
        q_rope, k_rope = self.rotary(positions, q_rope, k_rope)
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        w_uk, w_uv = w_kv.split([self.nope_dim, self.v_dim], dim=1)
        q_latent = torch.einsum("thd,hdr->thr", q_nope, w_uk)
        out = self.attn(positions, torch.cat((q_latent, q_rope), dim=-1),
                        torch.cat((latent[:, None, :], k_rope), dim=-1), latent, batch)
        out = torch.einsum("thr,hvr->thv", out.view(tokens, self.num_heads, self.latent_dim), w_uv)
        return self.o_proj(out.reshape(tokens, self.num_heads * self.v_dim))


def deepseek_routing(config: PretrainedConfig) -> Routing:
    """The router of config.json's model_type, refusing by name what it does not implement."""
    scoring = getattr(config, "scoring_func", None)
    method = getattr(config, "topk_method", None)
    common = dict(num_experts=config.n_routed_experts, top_k=config.num_experts_per_tok,
                  renormalize=bool(config.norm_topk_prob), scaling_factor=float(config.routed_scaling_factor))
    if config.model_type == "deepseek_v3":
        if scoring not in (None, "sigmoid") or method not in (None, "noaux_tc"):
            raise ValueError(f"DeepSeek-V3 routing scoring_func={scoring!r} topk_method={method!r} is not supported "
                             "(sigmoid, noaux_tc)")
        return Routing(**common, scoring="sigmoid", num_groups=config.n_group or 1,
                       topk_groups=config.topk_group or 1, group_score="top2_sum", correction_bias=True)
    if scoring not in (None, "softmax"):
        raise ValueError(f"DeepSeek-V2 routing scoring_func={scoring!r} is not supported (softmax)")
    if method in (None, "greedy"):
        return Routing(**common)
    if method == "group_limited_greedy":
        return Routing(**common, num_groups=config.n_group, topk_groups=config.topk_group, group_score="max")
    raise ValueError(f"DeepSeek-V2 topk_method {method!r} is not supported (greedy, group_limited_greedy)")


class DeepseekDecoderLayer(LlamaDecoderLayer):
    attention_cls = DeepseekMLA

    @staticmethod
    def make_mlp(config: PretrainedConfig, layer_id: int, dtype: torch.dtype, groups: ParallelGroups,
                 quant: Fp8Scheme | None) -> nn.Module:
        if getattr(config, "moe_layer_freq", 1) != 1:
            raise ValueError(f"moe_layer_freq {config.moe_layer_freq} is not supported (1)")
        prefix = mlp_prefix(layer_id)
        if layer_id < (config.first_k_dense_replace or 0):
            return LlamaMLP(config, dtype, groups.tp, quant=quant, prefix=prefix)
        shared_size = config.moe_intermediate_size * config.n_shared_experts
        shared = LlamaMLP(config, dtype, groups.tp, intermediate_size=shared_size, quant=quant,
                          prefix=f"{prefix}.shared_experts") if config.n_shared_experts else None
        return SparseMoeBlock(config.hidden_size, config.moe_intermediate_size, deepseek_routing(config),
                              dtype=dtype, groups=groups, shared=shared, quant=quant, prefix=prefix)


class DeepseekForCausalLM(LlamaForCausalLM):
    layer_cls = DeepseekDecoderLayer
    stacked_params = (("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1))
    renamed_modules = (("shared_experts", "shared"),)

    def checkpoint_name_to_param(self, name: str):
        # DeepSeek-V3 checkpoints carry the multi-token-prediction module as an extra layer.
        parts = name.split(".")
        if parts[:2] == ["model", "layers"] and int(parts[2]) >= self.config.num_hidden_layers:
            return None
        return super().checkpoint_name_to_param(name)
