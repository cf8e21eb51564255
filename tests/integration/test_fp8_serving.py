"""FP8 served through a real server over HTTP (/generate, greedy, token ids in and out).

`--quantization fp8` quantizes the tiny Llama's linear layers per channel at load: its output
equals transformers on the same model with every linear weight quantized per channel and
dequantized (written by tests/fp8_checkpoints.py, independently of meshserve's code).
`--kv-cache-dtype fp8_e4m3` equals transformers whose attention rounds every key and value to
FP8 as the pool stores them (scale 1.0: the checkpoint has none)."""

from __future__ import annotations

import random

import pytest

from tests.fp8_checkpoints import ONLINE, hf_greedy_fp8_kv, make_fp8_checkpoint
from tests.hf_reference import hf_greedy
from tests.server_process import start_server

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(8)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (6, 17, 30)]


def _served(server, prompts) -> list[list[int]]:
    with server.client() as http:
        body = {"input_ids": prompts, "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0.0,
                                                          "ignore_eos": True}}
        response = http.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return [item["output_ids"] for item in response.json()]


@pytest.fixture(scope="module")
def online_server(tiny_llama_dir, tmp_path_factory):
    server = start_server(tmp_path_factory.mktemp("online_fp8"), "--model-path", str(tiny_llama_dir),
                          "--quantization", "fp8", "--max-total-tokens", "2048")
    yield server
    server.stop()


def test_quantization_fp8_equals_the_per_channel_dequantized_model(online_server, tiny_llama_dir, prompts,
                                                                   tmp_path):
    _, dequant_dir = make_fp8_checkpoint(tiny_llama_dir, tmp_path / "fp8", tmp_path / "dequant", ONLINE)
    reference = hf_greedy(dequant_dir, prompts, NEW_TOKENS)
    assert reference != hf_greedy(tiny_llama_dir, prompts, NEW_TOKENS), "quantization changed nothing: a weak test"
    assert _served(online_server, prompts) == reference
    assert "FP8: fp8 (quantized at load" in online_server.log()  # the start-up log names the scheme and path
    assert "layers on the dequant GEMM path" in online_server.log()


def test_kv_cache_dtype_fp8_e4m3_equals_transformers_with_rounded_kv(tiny_llama_dir, prompts, tmp_path):
    server = start_server(tmp_path, "--model-path", str(tiny_llama_dir), "--kv-cache-dtype", "fp8_e4m3",
                          "--max-total-tokens", "2048")
    try:
        assert _served(server, prompts) == hf_greedy_fp8_kv(tiny_llama_dir, prompts, NEW_TOKENS)
        assert "KV cache in fp8_e4m3 with scale 1.0" in server.log()
    finally:
        server.stop()
