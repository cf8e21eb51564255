"""The benchmark's random MoE checkpoints (meshserve.bench.random_model) are real checkpoints of
their architectures — transformers loads them with no missing or unexpected tensor and meshserve's
greedy output equals its own — here at tiny widths of the same layouts; and the MoE decode floor
counts the experts a batch touches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from meshserve.bench import random_model
from meshserve.bench.linear_floor import moe_active_bytes

TINY = {"qwen3-30b-a3b": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, num_experts=8, vocab_size=1000),
        "deepseek-v2-lite": dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_attention_heads=4,
                                 num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                                 v_head_dim=16, n_routed_experts=8, vocab_size=1000)}


@pytest.mark.parametrize("shape", sorted(TINY))
def test_random_moe_checkpoint_loads_in_transformers_and_meshserve(shape, tmp_path, monkeypatch):
    from tests.hf_reference import hf_greedy
    from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

    monkeypatch.setitem(random_model.SHAPES, "tiny", random_model.SHAPES[shape] | TINY[shape])
    model_dir = random_model.write_random_model("tiny", tmp_path / "m", dtype="float32", device="cpu", num_layers=2)
    _, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    prompts = [[5, 6, 7, 8, 9], [100, 200, 300]]
    outs = run_to_completion(build_scheduler(model_dir, "--skip-tokenizer-init"),
                             {str(i): (p, greedy(6)) for i, p in enumerate(prompts)})
    assert [output_ids(outs[str(i)]) for i in range(2)] == hf_greedy(model_dir, prompts, 6)


def test_moe_floor_grows_with_the_experts_a_batch_touches():
    one, many, all_touched = (moe_active_bytes("qwen3-30b-a3b", b) for b in (1, 64, 4096))
    assert one < many < all_touched
    # Batch 1 reads 8 of 128 experts per layer: about 3.3 B active parameters of 30.5 B (bf16).
    assert 5e9 < one < 7.5e9 and 59e9 < all_touched < 62e9
