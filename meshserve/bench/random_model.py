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
}

SHARD_BYTES = 4 << 30


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    d = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                   p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def write_random_model(shape: str, out: Path, *, dtype: str = "bfloat16", device: str = "cuda", seed: int = 0) -> Path:
    cfg = SHAPES[shape]
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

    for name, dims in tensor_shapes(cfg).items():
        if len(dims) == 1:  # norms near 1, as trained models have
            t = 1.0 + 0.1 * torch.randn(dims, generator=gen, device=device)
        else:  # std chosen so activations neither vanish nor explode through the layers
            t = torch.randn(dims, generator=gen, device=device) * (1.0 / dims[-1] ** 0.5)
        shard[name] = t.to(torch_dtype)
        shard_bytes += shard[name].numel() * shard[name].element_size()
        if shard_bytes >= SHARD_BYTES:
            flush()
    flush()
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
    ns = parser.parse_args(argv)
    print(write_random_model(ns.shape, ns.out, dtype=ns.dtype, device=ns.device, seed=ns.seed))


if __name__ == "__main__":
    main()
