"""Write a random-weight Hugging Face model directory of a known shape, fast, on the GPU machine
(where no weights can be downloaded): `python -m meshserve.bench.random_model --shape llama-3.1-8b --out DIR`.

Tensors are drawn directly on the chosen device and saved as safetensors shards with the
checkpoint names transformers uses, so both transformers and meshserve load the directory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

SHAPES: dict[str, dict] = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
                         rms_norm_eps=1e-5, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True),
    "llama-small": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
                        rms_norm_eps=1e-5, tie_word_embeddings=False),
    # Mixture-of-experts shapes (model_type picks the tensor layout; see tensor_shapes).
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=2048,
                          intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
                          vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
                          tie_word_embeddings=False),
    "deepseek-v2-lite": dict(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"], hidden_size=2048,
                             intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                             num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                             n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, topk_method="greedy",
                             norm_topk_prob=False, routed_scaling_factor=1.0, vocab_size=102400,
                             max_position_embeddings=163840, rms_norm_eps=1e-6, tie_word_embeddings=False,
                             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                                              "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                                              "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707}),
}


def num_experts(cfg: dict) -> int:
    """Routed experts per MoE layer (0 for dense shapes)."""
    return cfg.get("num_experts") or cfg.get("n_routed_experts") or 0


def is_sparse_layer(cfg: dict, layer: int) -> bool:
    if not num_experts(cfg):
        return False
    if cfg["model_type"].startswith("deepseek"):
        return layer >= cfg.get("first_k_dense_replace", 0)
    return layer not in cfg.get("mlp_only_layers", []) and (layer + 1) % cfg.get("decoder_sparse_step", 1) == 0


def _attention_shapes(cfg: dict, p: str) -> dict[str, tuple[int, ...]]:
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    if "kv_lora_rank" in cfg:  # DeepSeek MLA (no q_lora_rank)
        qk, r, rope = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"], cfg["kv_lora_rank"], cfg["qk_rope_head_dim"]
        return {p + "self_attn.q_proj.weight": (heads * qk, h), p + "self_attn.kv_a_proj_with_mqa.weight": (r + rope, h),
                p + "self_attn.kv_a_layernorm.weight": (r,),
                p + "self_attn.kv_b_proj.weight": (heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]), r),
                p + "self_attn.o_proj.weight": (h, heads * cfg["v_head_dim"])}
    d = cfg.get("head_dim") or h // heads
    kv = cfg["num_key_value_heads"] * d
    shapes = {p + "self_attn.q_proj.weight": (heads * d, h), p + "self_attn.k_proj.weight": (kv, h),
              p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, heads * d)}
    if cfg.get("model_type") == "qwen3_moe":
        shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    return shapes


def _mlp_shapes(p: str, h: int, i: int) -> dict[str, tuple[int, ...]]:
    return {p + "gate_proj.weight": (i, h), p + "up_proj.weight": (i, h), p + "down_proj.weight": (h, i)}

SHARD_BYTES = 4 << 30


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= _attention_shapes(cfg, p)
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if not is_sparse_layer(cfg, layer):
            shapes |= _mlp_shapes(p + "mlp.", h, i)
            continue
        shapes[p + "mlp.gate.weight"] = (num_experts(cfg), h)
        for e in range(num_experts(cfg)):
            shapes |= _mlp_shapes(f"{p}mlp.experts.{e}.", h, cfg["moe_intermediate_size"])
        if cfg.get("n_shared_experts"):
            shapes |= _mlp_shapes(p + "mlp.shared_experts.", h, cfg["moe_intermediate_size"] * cfg["n_shared_experts"])
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def write_random_model(shape: str, out: Path, *, dtype: str = "bfloat16", device: str = "cuda", seed: int = 0,
                       num_layers: int | None = None, vocab_size: int | None = None,
                       config_only: bool = False) -> Path:
    """`num_layers` cuts the model to fewer layers of the same shape (a 30B MoE does not fit the
    GPU machine's disk whole; per-layer figures do not need all of them). `config_only` writes
    config.json alone, for `--load-format dummy` (the whole 30B shape, no disk)."""
    cfg = SHAPES[shape] | ({"num_hidden_layers": num_layers} if num_layers else {}) \
        | ({"vocab_size": vocab_size} if vocab_size else {})
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes, shard_index = 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, shard_index
        if shard:
            name = f"model-{shard_index:05d}.safetensors"
            save_file({k: v.cpu() for k, v in shard.items()}, str(out / name))
            weight_map.update({k: name for k in shard})
            shard, shard_bytes, shard_index = {}, 0, shard_index + 1

    for name, dims in ({} if config_only else tensor_shapes(cfg)).items():
        if len(dims) == 1:  # norms near 1, as trained models have
            t = 1.0 + 0.1 * torch.randn(dims, generator=gen, device=device)
        else:  # std chosen so activations neither vanish nor explode through the layers
            t = torch.randn(dims, generator=gen, device=device) * (1.0 / dims[-1] ** 0.5)
        shard[name] = t.to(torch_dtype)
        shard_bytes += shard[name].numel() * shard[name].element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
    if not config_only:
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype, "attention_bias": False, **cfg}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-layers", type=int, help="fewer layers of the same shape")
    parser.add_argument("--vocab-size", type=int,
                        help="another vocabulary size (to pair the shape with a real tokenizer's ids)")
    parser.add_argument("--config-only", action="store_true",
                        help="write config.json only (serve it with --load-format dummy)")
    ns = parser.parse_args(argv)
    print(write_random_model(ns.shape, ns.out, dtype=ns.dtype, device=ns.device, seed=ns.seed,
                             num_layers=ns.num_layers, vocab_size=ns.vocab_size,
                             config_only=ns.config_only))


if __name__ == "__main__":
    main()
