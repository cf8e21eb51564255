"""Expert parallelism over real ranks (multi-process torch.distributed over gloo): --tp 2 --ep 2
--moe-a2a-backend deepep spreads each layer's experts over the two ranks and moves every
(token, expert) pair to its expert's rank and back with meshserve's all-to-all dispatcher
(all_to_all_single; DeepEP is not installed here), also with redundant expert copies
(--ep-num-redundant-experts). Greedy output equals tp=1's, which is transformers'."""

from __future__ import annotations

import random

import pytest

from tests.hf_reference import hf_greedy
from tests.tp_worker import tp_generate


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (5, 23)]


@pytest.mark.parametrize(("arch", "flags", "count"), [
    # One sequence: every decode step has one token for two ranks, so one rank's share is empty.
    ("mixtral", ("--ep", "2", "--moe-a2a-backend", "deepep"), 1),
    ("qwen3_moe", ("--ep-size", "2", "--moe-a2a-backend", "deepep"), 2),
    ("deepseek_v3", ("--ep", "2", "--moe-a2a-backend", "deepep"), 2),
    # Redundant experts: 8 + 2 slots, 5 per rank; experts 0 and 1 have a copy on each rank and
    # their tokens alternate between the copies (all-reduce dispatch).
    ("qwen3_moe", ("--ep", "2", "--ep-num-redundant-experts", "2"), 2),
], ids=["mixtral-one-sequence", "qwen3_moe", "deepseek_v3", "qwen3_moe-redundant"])
def test_expert_parallel_matches_transformers(request, arch, flags, count, prompts, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    reference = hf_greedy(model_dir, prompts[:count], 10)
    assert tp_generate(model_dir, 2, prompts[:count], 10, tmp_path, ("--chunked-prefill-size", "8", *flags)) \
        == reference
