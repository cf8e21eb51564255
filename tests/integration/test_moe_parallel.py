"""MoE models over several ranks (real multi-process torch.distributed over gloo), greedy-equal to
tp=1 (which is transformers'):

* --tp 2: experts split over the intermediate size (moe_tp), attention heads split (DeepSeek's
  latent KV cache replicated on every rank), shared experts and dense layers as dense MLPs;
* --tp 2 --ep 2 --moe-a2a-backend none: experts spread over the ranks (moe_ep), tokens staying
  put, partial outputs all-reduced (the all-to-all dispatcher: test_moe_expert_parallel.py)."""

from __future__ import annotations

import random

import pytest

from tests.hf_reference import hf_greedy
from tests.tp_worker import tp_generate


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (5, 23)]


@pytest.mark.parametrize(("arch", "flags"), [
    ("mixtral", ()),
    ("deepseek_v3", ()),
    ("qwen2_moe", ("--ep", "2", "--moe-a2a-backend", "none")),
], ids=["mixtral-tp2", "deepseek_v3-tp2", "qwen2_moe-tp2-ep2-none"])
def test_parallel_moe_matches_transformers(request, arch, flags, prompts, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    reference = hf_greedy(model_dir, prompts, 10)
    assert tp_generate(model_dir, 2, prompts, 10, tmp_path, ("--chunked-prefill-size", "8", *flags)) == reference
