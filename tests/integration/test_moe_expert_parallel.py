"""Expert parallelism over real ranks (multi-process torch.distributed over gloo): --tp 2 --ep 2
--moe-a2a-backend deepep spreads each layer's experts over the two ranks and moves every
(token, expert) pair to its expert's rank and back with meshserve's all-to-all dispatcher
(all_to_all_single; DeepEP is not installed here), also with redundant expert copies
(--ep-num-redundant-experts) and with EPLB moving experts between the ranks during generation
(--enable-eplb). Greedy output equals tp=1's, which is transformers'."""

from __future__ import annotations

import random

import pytest

from tests.hf_reference import hf_greedy
from tests.tp_worker import tp_generate, tp_generate_with_stats


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


EPLB = ("--ep-num-redundant-experts", "2", "--enable-eplb", "--eplb-rebalance-num-iterations", "3")


@pytest.mark.parametrize(("arch", "experts", "flags"), [
    ("deepseek_v3", 8, ("--ep", "2", "--moe-a2a-backend", "deepep", *EPLB)),
    # DP attention: prompt i goes to DP group i mod 2; group 0's short prompt finishes first and
    # it keeps joining the MoE layers with idle forwards, which count as steps on every rank.
    ("mixtral", 4, ("--dp-size", "2", "--enable-dp-attention", "--ep", "2", *EPLB)),
], ids=["deepseek_v3-deepep", "mixtral-dp-attention"])
def test_eplb_rebalances_during_generation_and_outputs_stay_transformers(request, arch, experts, flags, prompts,
                                                                         tmp_path):
    """A rebalance every 3 forward steps (prefill chunks of 8 and decode steps: several during
    each sequence): the hottest experts take the 2 redundant slots, copies move between the
    ranks, and the greedy outputs stay transformers'."""
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    reference = hf_greedy(model_dir, prompts, 10)
    outputs, stats = tp_generate_with_stats(model_dir, 2, prompts, 10, tmp_path,
                                            ("--chunked-prefill-size", "8", *flags))
    assert outputs == reference
    assert stats["eplb_rebalances"] >= 3 and stats["eplb_moved_experts"] > 0
    # Loads per logical expert and per rank; every counted pair is on one expert and one rank,
    # and whole forward steps are counted (2 MoE layers, top-2: 4 pairs per token) but the last
    # two (gathered at the next rebalance; at most 2 decode tokens each).
    expert_tokens, ranks = stats["expert_tokens"], stats["ep_rank_tokens"]
    assert len(expert_tokens) == experts and len(ranks) == 2 and min(ranks) > 0
    tokens = sum(len(p) for p in prompts) + len(prompts) * 9  # the prompts, then 9 decode steps each
    assert sum(expert_tokens) == sum(ranks) and sum(expert_tokens) % 4 == 0
    assert 4 * (tokens - 4) <= sum(expert_tokens) <= 4 * tokens
