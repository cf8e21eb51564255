"""--load-format dummy: a model directory with config.json and a tokenizer but no weights serves
(random weights, for benchmarks of a shape); the default format still requires the weights."""

from __future__ import annotations

import pytest

import meshserve
from meshserve.config.server_args import ServerArgs
from meshserve.runtime import StartupError
from tests.models import make_tiny_qwen3_moe

GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def config_only_dir(tmp_path_factory, tokenizer_dir):
    path = make_tiny_qwen3_moe(tmp_path_factory.mktemp("qwen3_moe_config_only"), tokenizer_dir=tokenizer_dir)
    for weights in path.glob("*.safetensors*"):
        weights.unlink()
    return path


def test_dummy_weights_serve_a_directory_without_a_checkpoint(config_only_dir):
    outputs = []
    for _ in range(2):
        with meshserve.Engine(str(config_only_dir), device="cpu", max_total_tokens=1024,
                              load_format="dummy") as engine:
            outputs.append(engine.generate("The capital of France is", GREEDY)["output_ids"])
    assert len(outputs[0]) == 6
    assert outputs[0] == outputs[1]  # seeded: every run (and every rank) draws the same weights


def test_the_default_format_still_needs_the_weights(config_only_dir):
    with pytest.raises(StartupError, match="no safetensors weights"):
        meshserve.Engine(str(config_only_dir), device="cpu", max_total_tokens=1024)


def test_unknown_load_format_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        ServerArgs.from_cli(["--load-format", "gguf"])
    assert "--load-format" in capsys.readouterr().err
