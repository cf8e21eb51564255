"""MoE models over tensor-parallel ranks (real multi-process torch.distributed over gloo): experts
split over the intermediate size (moe_tp), attention heads split (DeepSeek's latent KV cache
replicated on every rank), shared experts and dense layers split as dense MLPs — the greedy
output of tp=1, which is transformers'."""

from __future__ import annotations

import random

import pytest

from tests.hf_reference import hf_greedy
from tests.tp_worker import tp_generate


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (5, 23)]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_tp2_matches_transformers(request, arch, prompts, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    reference = hf_greedy(model_dir, prompts, 10)
    assert tp_generate(model_dir, 2, prompts, 10, tmp_path, ("--chunked-prefill-size", "8")) == reference
