"""Llama-family decoder (Llama 2/3/3.1, SmolLM2, Mistral; Qwen2 through `attention_bias`).

The model is written against parallel layers only; the named groups of ParallelGroups decide
the shards: attention and the embeddings over `attn_tp`, the dense MLP over `tp`.
Checkpoint names map onto fused parameters through `stacked_params` (q/k/v -> qkv_proj,
gate/up -> gate_up_proj).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PretrainedConfig

from meshserve.cluster.comm import RankGroup
from meshserve.cluster.groups import ParallelGroups
from meshserve.config.quantization import Fp8Scheme
from meshserve.executor.forward_batch import ForwardBatch
from meshserve.layers.activation import silu_and_mul
from meshserve.layers.attention.layer import AttentionLayer
from meshserve.layers.dp_attention import mlp_over_dp_groups
from meshserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from meshserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, layer_fp8
from meshserve.layers.moe.experts import expert_checkpoint_target, unused_expert_tensor
from meshserve.layers.norm import RMSNorm
from meshserve.layers.rotary import RotaryEmbedding


class LlamaMLP(nn.Module):
    def __init__(self, config: PretrainedConfig, dtype: torch.dtype, tp: RankGroup,
                 intermediate_size: int | None = None, *, quant: Fp8Scheme | None = None, prefix: str = "") -> None:
        """`intermediate_size` overrides the config's (MoE models' dense layers and shared experts);
        `prefix` is the checkpoint module name (`model.layers.3.mlp`), which FP8 skip lists name."""
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"activation {config.hidden_act!r} is not supported (only silu)")
        bias = getattr(config, "mlp_bias", False)
        size = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [size] * 2, bias=bias, dtype=dtype, tp=tp,
            fp8=layer_fp8(quant, [f"{prefix}.gate_proj", f"{prefix}.up_proj"]))
        self.down_proj = RowParallelLinear(size, config.hidden_size, bias=bias, dtype=dtype, tp=tp,
                                           fp8=layer_fp8(quant, [f"{prefix}.down_proj"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def mlp_prefix(layer_id: int) -> str:
    """The checkpoint module name of a layer's MLP, which FP8 skip lists name."""
    return f"model.layers.{layer_id}.mlp"


class LlamaAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, layer_id: int, rotary: RotaryEmbedding,
                 dtype: torch.dtype, tp: RankGroup, quant: Fp8Scheme | None = None) -> None:
        super().__init__()
        prefix = f"model.layers.{layer_id}.self_attn"  # checkpoint module names, which FP8 skip lists name
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.qkv_proj = QKVParallelLinear(config.hidden_size, head_dim, config.num_attention_heads, num_kv_heads,
                                          bias=self.qkv_bias(config), dtype=dtype, tp=tp,
                                          fp8=layer_fp8(quant, [f"{prefix}.{p}_proj" for p in "qkv"]))
        self.o_proj = RowParallelLinear(config.num_attention_heads * head_dim, config.hidden_size,
                                        bias=self.o_bias(config), dtype=dtype, tp=tp,
                                        fp8=layer_fp8(quant, [f"{prefix}.o_proj"]))
        self.attn = AttentionLayer(layer_id, self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, head_dim,
                                   scaling=head_dim**-0.5, rotary=rotary)
        self.head_dim = head_dim

    @staticmethod
    def qkv_bias(config: PretrainedConfig) -> bool:
        return bool(getattr(config, "attention_bias", False))

    @staticmethod
    def o_bias(config: PretrainedConfig) -> bool:
        return bool(getattr(config, "attention_bias", False))

    def project_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook between the projection and rotary: Qwen3 normalises q and k per head here."""
        return q, k

    def forward(self, positions: torch.Tensor, x: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], dim=-1)
        q = q.view(-1, self.attn.num_heads, self.head_dim)
        k = k.view(-1, self.attn.num_kv_heads, self.head_dim)
        q, k = self.project_qk(q, k)
        return self.o_proj(self.attn(positions, q, k, v, batch))


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: PretrainedConfig, layer_id: int, rotary: RotaryEmbedding,
                 dtype: torch.dtype, groups: ParallelGroups, quant: Fp8Scheme | None = None) -> None:
        super().__init__()
        self.self_attn = self.attention_cls(config, layer_id, rotary, dtype, groups.attn_tp, quant)
        self.mlp = self.make_mlp(config, layer_id, dtype, groups, quant)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        # DP attention: the MLP runs over the tokens of every DP group (layers/dp_attention.py).
        self.dp = groups.dp if groups.layout.dp_attention else None

    def run_mlp(self, hidden: torch.Tensor, dp_counts: list[int] | None) -> torch.Tensor:
        """The MLP on this step's tokens; under DP attention (`dp_counts`: tokens per DP group)
        over every DP group's, keeping this group's rows."""
        if dp_counts is None or self.dp is None:
            return self.mlp(hidden)
        return mlp_over_dp_groups(self.mlp, hidden, dp_counts, self.dp)

    @staticmethod
    def make_mlp(config: PretrainedConfig, layer_id: int, dtype: torch.dtype, groups: ParallelGroups,
                 quant: Fp8Scheme | None) -> nn.Module:
        """The layer's MLP: dense here (over groups.tp); MoE models choose per layer (mixtral.py,
        qwen_moe.py, deepseek.py). `quant`: FP8 weights (None: high precision)."""
        return LlamaMLP(config, dtype, groups.tp, quant=quant, prefix=mlp_prefix(layer_id))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.run_mlp(hidden, batch.dp_counts), residual


class LlamaForCausalLM(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    # checkpoint-name fragment -> (fused parameter fragment, shard id)
    stacked_params: tuple[tuple[str, str, int | str], ...] = (
        ("q_proj", "qkv_proj", "q"),
        ("k_proj", "qkv_proj", "k"),
        ("v_proj", "qkv_proj", "v"),
        ("gate_proj", "gate_up_proj", 0),
        ("up_proj", "gate_up_proj", 1),
    )

    def __init__(self, config: PretrainedConfig, *, dtype: torch.dtype, groups: ParallelGroups,
                 max_positions: int, quant: Fp8Scheme | None = None) -> None:
        super().__init__()
        self.config = config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rotary = RotaryEmbedding(config, head_dim, max_positions)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype=dtype,
                                                   tp=groups.attn_tp)
        self.layers = nn.ModuleList(
            self.layer_cls(config, i, rotary, dtype, groups, quant) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype=dtype)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, dtype=dtype, tp=groups.attn_tp)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.tie_to(self.embed_tokens)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits [batch_size, vocab] (float32) of each sequence's last new token."""
        hidden = self.embed_tokens(batch.input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(batch.positions, hidden, residual, batch)
        hidden, _ = self.norm(hidden, residual)
        last = batch.last_token_index()
        return self.lm_head.logits(hidden if last is None else hidden[last])

    def idle_forward(self, dp_counts: list[int]) -> None:
        """DP attention: this DP group has no tokens this step, the others have `dp_counts`; join
        every layer's MLP collectives (attention and the LM head are the group's own)."""
        empty = self.embed_tokens.weight.new_empty(0, self.config.hidden_size)
        for layer in self.layers:
            layer.run_mlp(empty, dp_counts)

    # checkpoint-name fragment -> our module-name fragment (e.g. Mixtral's block_sparse_moe -> mlp)
    renamed_modules: tuple[tuple[str, str], ...] = ()

    def checkpoint_name_to_param(self, name: str) -> tuple[str, int | str | None] | tuple[str, str, int] | None:
        """Map a checkpoint tensor name to (our parameter name, shard id), or for one expert's
        projection to (stacked parameter name, shard id, expert id); None to skip it."""
        name = name.removeprefix("model.")
        for fragment, ours in self.renamed_modules:
            name = name.replace(f".{fragment}.", f".{ours}.")
        expert = expert_checkpoint_target(name)
        if expert is not None:
            return expert
        if "rotary_emb.inv_freq" in name or unused_expert_tensor(name):
            return None
        if name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
            return None  # tied: the embedding weight is loaded once
        for fragment, fused, shard_id in self.stacked_params:
            if f".{fragment}." in name:
                return name.replace(f".{fragment}.", f".{fused}."), shard_id
        return name, None
