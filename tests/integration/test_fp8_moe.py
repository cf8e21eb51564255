"""FP8 MoE models: block-wise FP8 checkpoints in DeepSeek-V3's official layout (FP8 MLA
projections, shared experts, dense first layer and per-expert `weight_scale_inv`) and Qwen's
(Qwen3-MoE), made from tiny random models (tests/fp8_checkpoints.py), give the greedy output of
transformers on the same models with the FP8 weights dequantized: at tp=1 and over 2 gloo ranks
with expert parallelism, redundant experts and EPLB rebalances (block scales cut with the
attention shards, experts and their scales split by rank and moved between ranks).
`--quantization fp8` on a plain Mixtral quantizes its experts per row at load."""

from __future__ import annotations

import random

import pytest
from safetensors import safe_open

from tests.fp8_checkpoints import LAYOUTS, make_fp8_checkpoint, online_dequantized
from tests.hf_reference import hf_greedy
from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion
from tests.tp_worker import tp_generate_with_stats

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(14)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (5, 23)]


def _fp8_model(request, arch: str, tmp_path_factory, layout: str = "block-16") -> tuple:
    """(fp8 dir, transformers' greedy output on the dequantized model) for a checkpoint of
    `layout` (tests/fp8_checkpoints.py; default 16x16 blocks)."""
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    root = tmp_path_factory.mktemp(f"fp8-{arch}")
    fp8_dir, dequant_dir = make_fp8_checkpoint(model_dir, root / "fp8", root / "dequant", LAYOUTS[layout])
    prompts = request.getfixturevalue("prompts")
    reference = hf_greedy(dequant_dir, prompts, NEW_TOKENS)
    assert reference != hf_greedy(model_dir, prompts, NEW_TOKENS), "quantization changed nothing: a weak test"
    return fp8_dir, reference


@pytest.fixture(scope="module")
def deepseek_v3_fp8(request, tmp_path_factory):
    return _fp8_model(request, "deepseek_v3", tmp_path_factory)


def _generate(model_dir, prompts, *extra) -> list[list[int]]:
    outs = run_to_completion(build_scheduler(model_dir, *extra),
                             {str(i): (p, greedy(NEW_TOKENS)) for i, p in enumerate(prompts)})
    return [output_ids(outs[str(i)]) for i in range(len(prompts))]


def test_deepseek_v3_block_fp8_checkpoint(deepseek_v3_fp8, prompts):
    fp8_dir, reference = deepseek_v3_fp8
    assert _generate(fp8_dir, prompts) == reference


def test_deepseek_v3_block_fp8_with_expert_parallelism(deepseek_v3_fp8, prompts, tmp_path):
    """--tp 2 --ep 2 with 2 redundant experts and EPLB every 3 steps: MLA's block scales cut per
    attention head shard, each rank's experts with their own scales, and rebalances that move
    FP8 experts between ranks with their scales."""
    fp8_dir, reference = deepseek_v3_fp8
    flags = ("--chunked-prefill-size", "8", "--ep", "2", "--ep-num-redundant-experts", "2", "--enable-eplb",
             "--eplb-rebalance-num-iterations", "3")
    outputs, stats = tp_generate_with_stats(fp8_dir, 2, prompts, NEW_TOKENS, tmp_path, flags)
    assert outputs == reference
    assert stats["eplb_rebalances"] >= 3 and stats["eplb_moved_experts"] > 0


@pytest.fixture(scope="module")
def qwen3_moe_fp8(request, tmp_path_factory):
    return _fp8_model(request, "qwen3_moe", tmp_path_factory)


def test_qwen3_moe_block_fp8_checkpoint(qwen3_moe_fp8, prompts):
    fp8_dir, reference = qwen3_moe_fp8
    assert _generate(fp8_dir, prompts, "--chunked-prefill-size", "7") == reference


def test_qwen3_moe_block_fp8_with_expert_tensor_parallelism(qwen3_moe_fp8, prompts, tmp_path):
    """--tp 2 without --ep: every FP8 expert split over 2 real ranks (16 of its 32 intermediate
    rows, one block, each), partial outputs all-reduced (the exact cuts: test_moe_layers.py)."""
    fp8_dir, reference = qwen3_moe_fp8
    outputs, _ = tp_generate_with_stats(fp8_dir, 2, prompts, NEW_TOKENS, tmp_path)
    assert outputs == reference


def test_mixtral_per_tensor_fp8_checkpoint_with_static_input_scales(request, prompts, tmp_path_factory):
    """compressed-tensors per-tensor FP8 (the layout of FP8 Mixtral releases): one scalar scale per
    expert projection, widened to its rows, and a static `input_scale` the W8A16 experts skip."""
    fp8_dir, reference = _fp8_model(request, "mixtral", tmp_path_factory, "compressed-tensors-tensor")
    with safe_open(str(fp8_dir / "model.safetensors"), framework="pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.3.w2.input_scale" in f.keys()
        assert f.get_tensor("model.layers.0.block_sparse_moe.experts.3.w2.weight_scale").numel() == 1
    assert _generate(fp8_dir, prompts) == reference


def test_online_fp8_quantizes_mixtral_experts(tiny_mixtral_dir, prompts, tmp_path):
    reference = hf_greedy(online_dequantized(tiny_mixtral_dir, tmp_path / "dequant", tp=1), prompts, NEW_TOKENS)
    assert reference != hf_greedy(tiny_mixtral_dir, prompts, NEW_TOKENS), "quantization changed nothing: a weak test"
    assert _generate(tiny_mixtral_dir, prompts, "--quantization", "fp8") == reference
