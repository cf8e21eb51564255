"""The torch-free model checks launch_server runs before anything heavy (config/preflight.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshserve.config.preflight import SUPPORTED_ARCHITECTURES, ModelDirError, ModelShape, check_model_dir


def write_config(directory: Path, **overrides: object) -> Path:
    config = {"architectures": ["LlamaForCausalLM"], "num_attention_heads": 8, "num_key_value_heads": 4,
              "intermediate_size": 64, **overrides}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_supported_architectures_equal_the_model_registry() -> None:
    # Duplicated so that the check needs no torch; this keeps the two lists equal.
    from meshserve.models.registry import MODEL_REGISTRY

    assert set(SUPPORTED_ARCHITECTURES) == set(MODEL_REGISTRY)


def test_reads_the_shape(tmp_path: Path) -> None:
    assert check_model_dir(str(write_config(tmp_path)), 4) == ModelShape("LlamaForCausalLM", 8, 4, 64)


@pytest.mark.parametrize(
    ("tp", "fine"),
    [(1, True), (2, True), (4, True), (8, True),  # 8 > 4 KV heads: each replicated on 2 ranks
     (3, False), (16, False)],  # 16 does not divide the 8 query heads
)
def test_tp_splits(tp: int, fine: bool) -> None:
    assert (ModelShape("LlamaForCausalLM", 8, 4, 64).tp_problems(tp) == []) is fine


def test_kv_heads_replicated_only_evenly() -> None:
    (problem,) = ModelShape("LlamaForCausalLM", 12, 4, 48).tp_problems(6)
    assert "not a multiple of the 4 KV heads" in problem
    (problem,) = ModelShape("LlamaForCausalLM", 8, 6, 64).tp_problems(4)
    assert "6 KV heads do not divide" in problem


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ModelDirError, match="does not exist"):
        check_model_dir(str(tmp_path / "typo"), 1)
    with pytest.raises(ModelDirError, match="has no config.json"):
        check_model_dir(str(tmp_path), 1)
    write_config(tmp_path, architectures=["GPT2LMHeadModel"])
    with pytest.raises(ModelDirError, match=r"\['GPT2LMHeadModel'\].*not supported; supported: LlamaForCausalLM"):
        check_model_dir(str(tmp_path), 1)
    write_config(tmp_path)
    with pytest.raises(ModelDirError, match="cannot run with --tp 3: 8 attention heads do not divide over --tp 3"):
        check_model_dir(str(tmp_path), 3)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="cannot read"):
        check_model_dir(str(tmp_path), 1)


def test_moe_shapes_are_checked_against_tp_and_ep(tmp_path):
    """Routed experts divide over --ep and their width over tp / ep; latent attention (MLA) has
    one KV head, replicated, whatever num_key_value_heads says."""
    import json

    config = {"architectures": ["DeepseekV3ForCausalLM"], "num_attention_heads": 8, "num_key_value_heads": 8,
              "kv_lora_rank": 32, "intermediate_size": 96, "moe_intermediate_size": 20, "n_routed_experts": 6}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = check_model_dir(str(tmp_path), 2, ep=2)
    assert (shape.num_kv_heads, shape.num_experts) == (1, 6)
    assert shape.tp_problems(8) == ["MoE intermediate size 20 does not divide over the MoE tensor-parallel size 8 "
                                    "(--tp / --ep)"]
    with pytest.raises(ModelDirError, match="6 routed experts do not divide over --ep 4"):
        check_model_dir(str(tmp_path), 4, ep=4)
