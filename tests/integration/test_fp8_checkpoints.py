"""FP8 checkpoints of each layout (fbgemm_fp8 per-channel, compressed-tensors per-tensor with a
static input scale and per-channel, DeepSeek block-wise), made from a tiny random Llama: the
engine's greedy output equals transformers on the same model with the FP8 weights dequantized
(tests/fp8_checkpoints.py writes both). Block-wise also on 2 real gloo ranks, and
--quantization fp8 on 2 ranks (each rank quantizes its own shard)."""

from __future__ import annotations

import random

import pytest

from meshserve.config.model_config import ModelConfigError
from meshserve.config.server_args import ServerArgs
from tests.fp8_checkpoints import LAYOUTS, make_fp8_checkpoint
from tests.hf_reference import hf_greedy
from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion
from tests.tp_worker import tp_generate

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(14)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (5, 23)]


@pytest.fixture(scope="module")
def checkpoints(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return {name: make_fp8_checkpoint(tiny_llama_dir, root / name, root / f"{name}-dequant", layout)
            for name, layout in LAYOUTS.items()}


def _generate(model_dir, prompts, *extra) -> list[list[int]]:
    scheduler = build_scheduler(model_dir, *extra)
    outs = run_to_completion(scheduler, {str(i): (p, greedy(NEW_TOKENS)) for i, p in enumerate(prompts)})
    return [output_ids(outs[str(i)]) for i in range(len(prompts))]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fp8_checkpoint_equals_its_dequantized_model(layout, checkpoints, prompts, tiny_llama_dir):
    fp8_dir, dequant_dir = checkpoints[layout]
    reference = hf_greedy(dequant_dir, prompts, NEW_TOKENS)
    assert reference != hf_greedy(tiny_llama_dir, prompts, NEW_TOKENS), "quantization changed nothing: a weak test"
    assert _generate(fp8_dir, prompts) == reference


def test_block_fp8_under_tensor_parallelism(checkpoints, prompts, tmp_path):
    fp8_dir, dequant_dir = checkpoints["block-16"]
    assert tp_generate(fp8_dir, 2, prompts, NEW_TOKENS, tmp_path) == hf_greedy(dequant_dir, prompts, NEW_TOKENS)


def test_unknown_quant_method_is_refused_by_name(checkpoints, tmp_path):
    import json
    import shutil

    fp8_dir, _ = checkpoints["fbgemm_fp8"]
    bad = tmp_path / "awq"
    shutil.copytree(fp8_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(config))
    from meshserve.config.model_config import ModelConfig

    with pytest.raises(ModelConfigError, match="quant_method 'awq' is not supported"):
        ModelConfig.from_server_args(ServerArgs.parse_args(["--model-path", str(bad)]))


def test_online_fp8_under_tensor_parallelism(tiny_llama_dir, prompts, tmp_path):
    """--quantization fp8 on 2 ranks: each rank quantizes its shard, which for row-parallel layers
    means one scale per (row, rank): equal to transformers on exactly those dequantized weights."""
    from tests.fp8_checkpoints import online_dequantized

    reference_dir = online_dequantized(tiny_llama_dir, tmp_path / "tp2-dequant", tp=2)
    reference = hf_greedy(reference_dir, prompts, NEW_TOKENS)
    assert reference != hf_greedy(online_dequantized(tiny_llama_dir, tmp_path / "tp1-dequant", tp=1), prompts,
                                  NEW_TOKENS), "per-rank scales changed nothing: a weak test"
    assert tp_generate(tiny_llama_dir, 2, prompts, NEW_TOKENS, tmp_path, ("--quantization", "fp8")) == reference
