"""Tiny random-weight Hugging Face model directories for tests.

Each ``make_tiny_*`` writes an ordinary HF directory (config.json, safetensors, generation config,
tokenizer) that meshserve and transformers both load, so the engine can be checked token for
token against transformers on several architectures without real weights.

Invariants:

* Deterministic: the same call writes bit-identical weights (fixed seed, CPU, float32).
* The tokenizer is the real SmolLM2 one (copied from the converted default model), so tests can
  send text prompts and chat messages; vocab_size matches it (49152).
* Shapes are tensor-parallel friendly: 4 attention heads and 2 KV heads, so tp=2 splits KV heads
  and tp=4 has to replicate them (num_kv_heads < tp).
* Both embedding layouts are covered: Qwen3 ties lm_head to the embedding (as does SmolLM2 itself),
  Llama and Qwen2 do not.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    GenerationConfig,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

from meshserve.config.default_model import default_model_path

SEED = 1234
VOCAB_SIZE = 49152  # SmolLM2 tokenizer
BOS_TOKEN_ID = 1  # <|im_start|>
EOS_TOKEN_ID = 2  # <|im_end|>

# Weight std. With transformers' default (0.02) a 64-wide model has logits spread ~0.15 over 49k
# tokens, and the tied Qwen3 just repeats its last input token, so a broken engine could still
# "match". 0.2 gives prompt-dependent, varied greedy output with well separated argmaxes while
# keeping attention soft (q.k/sqrt(d) spread ~2.5; at 0.5 it saturates to one-hot, which would
# hide attention bugs).
INIT_STD = 0.2

# With this limit (about 2/3 of one layer) the embedding and lm_head get shards of their own and
# every layer is split across two files, as in real multi-file checkpoints.
SMALL_SHARD_SIZE = "100KB"

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",  # not written by every transformers version
    "chat_template.jinja",  # idem
)


def _common(num_layers: int, num_kv_heads: int, tie_word_embeddings: bool) -> dict:
    return dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=16,  # hidden / heads; Qwen3's own default (128) would not match
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        initializer_range=INIT_STD,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=BOS_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        pad_token_id=EOS_TOKEN_ID,
        dtype="float32",
    )


def make_tiny_qwen3(
    path: Path | str,
    *,
    num_kv_heads: int = 2,
    num_layers: int = 2,
    tie_word_embeddings: bool = True,
    sharded: bool = False,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Tiny Qwen3 (q_norm/k_norm on heads, no qkv bias); ties embeddings by default."""
    config = Qwen3Config(**_common(num_layers, num_kv_heads, tie_word_embeddings))
    return _build(config, path, sharded=sharded, tokenizer_dir=tokenizer_dir)


def make_tiny_llama(
    path: Path | str,
    *,
    num_kv_heads: int = 2,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    sharded: bool = False,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Tiny Llama (no biases); separate lm_head by default."""
    config = LlamaConfig(**_common(num_layers, num_kv_heads, tie_word_embeddings))
    return _build(config, path, sharded=sharded, tokenizer_dir=tokenizer_dir)


def make_tiny_qwen2(
    path: Path | str,
    *,
    num_kv_heads: int = 2,
    num_layers: int = 2,
    tie_word_embeddings: bool = False,
    sharded: bool = False,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Tiny Qwen2 (q/k/v projections carry a bias); separate lm_head by default."""
    config = Qwen2Config(**_common(num_layers, num_kv_heads, tie_word_embeddings))
    return _build(config, path, sharded=sharded, tokenizer_dir=tokenizer_dir)


# Mixture-of-experts models: 2-3 layers, 4-8 experts of width 32, top-2, on the same attention
# shapes as above. Dense layers are mixed in where the architecture allows it, and every routing
# variant (renormalised or not, shared expert, ...) differs between the models.
MOE_INTERMEDIATE = 32


def make_tiny_mixtral(path: Path | str, *, tokenizer_dir: Path | None = None) -> Path:
    """Tiny Mixtral: 2 sparse layers, 4 experts, top-2 renormalised."""
    config = MixtralConfig(**{**_common(2, 2, False), "intermediate_size": MOE_INTERMEDIATE},
                           num_local_experts=4, num_experts_per_tok=2)
    return _build(config, path, sharded=False, tokenizer_dir=tokenizer_dir)


def make_tiny_qwen2_moe(path: Path | str, *, tokenizer_dir: Path | None = None) -> Path:
    """Tiny Qwen2-MoE: 3 layers, the first dense (mlp_only_layers), 8 experts top-2 not
    renormalised, a shared expert behind its sigmoid gate."""
    config = Qwen2MoeConfig(**_common(3, 2, False), num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=MOE_INTERMEDIATE, shared_expert_intermediate_size=48,
                            norm_topk_prob=False, mlp_only_layers=[0], decoder_sparse_step=1)
    return _build(config, path, sharded=False, tokenizer_dir=tokenizer_dir)


def make_tiny_qwen3_moe(path: Path | str, *, tokenizer_dir: Path | None = None) -> Path:
    """Tiny Qwen3-MoE: 2 layers (the second sparse: decoder_sparse_step 2), 8 experts top-2
    renormalised, tied embeddings."""
    config = Qwen3MoeConfig(**_common(2, 2, True), num_experts=8, num_experts_per_tok=2,
                            moe_intermediate_size=MOE_INTERMEDIATE, norm_topk_prob=True, decoder_sparse_step=2)
    return _build(config, path, sharded=False, tokenizer_dir=tokenizer_dir)


def _mla(num_layers: int) -> dict:
    """MLA and routed-expert shapes shared by the DeepSeek configs: 4 heads, latent 32, rope 8
    (head_dim is the rope part, as transformers sets it)."""
    return dict(**{**_common(num_layers, 4, False), "head_dim": 8}, kv_lora_rank=32, qk_rope_head_dim=8,
                qk_nope_head_dim=16, v_head_dim=16, moe_intermediate_size=MOE_INTERMEDIATE, first_k_dense_replace=1,
                n_shared_experts=1, num_experts_per_tok=2)


def make_tiny_deepseek_v3(path: Path | str, *, tokenizer_dir: Path | None = None) -> Path:
    """Tiny DeepSeek-V3: 3 layers (the first dense), MLA with q_lora_rank, YaRN rope, 8 experts
    in 4 groups (top-2 groups, top-2 experts, sigmoid + correction bias), one shared expert."""
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 512,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    config = DeepseekV3Config(**_mla(3), q_lora_rank=24, n_routed_experts=8, n_group=4, topk_group=2,
                              routed_scaling_factor=2.5, norm_topk_prob=True, rope_parameters=yarn)
    return _build(config, path, sharded=False, tokenizer_dir=tokenizer_dir)


def make_tiny_deepseek_v2(path: Path | str, *, tokenizer_dir: Path | None = None) -> Path:
    """Tiny DeepSeek-V2: 2 layers (the first dense), MLA without q_lora_rank, 8 experts in 4
    groups (group-limited greedy softmax), one shared expert, default rope."""
    config = DeepseekV2Config(**_mla(2), q_lora_rank=None, n_routed_experts=8, n_group=4, topk_group=2,
                              topk_method="group_limited_greedy", routed_scaling_factor=1.5)
    return _build(config, path, sharded=False, tokenizer_dir=tokenizer_dir)


def _build(
    config: PretrainedConfig, path: Path | str, *, sharded: bool, tokenizer_dir: Path | None
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        _randomize_small_params(model)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID, pad_token_id=EOS_TOKEN_ID
    )
    model.save_pretrained(path, max_shard_size=SMALL_SHARD_SIZE if sharded else "50GB")
    _copy_tokenizer(tokenizer_dir or default_model_path(), path)
    return path


@torch.no_grad()
def _randomize_small_params(model: torch.nn.Module) -> None:
    """Give norms and biases random values too.

    transformers initialises RMSNorm weights to 1 and biases to 0, which would let an engine that
    ignores them (e.g. forgets q_norm or the qkv bias) still match the reference.
    """
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: zero would hide an ignored bias
            buffer.normal_(0.0, 0.1)
    for name, param in model.named_parameters():
        if param.ndim == 1:
            if name.endswith("bias"):
                param.normal_(0.0, INIT_STD)
            else:  # norm weight: keep it around 1 so activations stay in range
                param.uniform_(0.5, 1.5)


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
