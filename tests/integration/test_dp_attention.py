"""DP attention (--tp 2 --dp-size 2 --enable-dp-attention) on real gloo ranks: each DP group
schedules its own prompts and attends over them alone, the MLP runs over both groups' tokens,
and greedy outputs equal transformers' — including the steps where one group has no work left
and only joins the other's MLP collectives (an idle forward)."""

from __future__ import annotations

import random

import pytest

from tests.hf_reference import hf_greedy
from tests.tp_worker import dp_generate

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    # Prompt i goes to DP group i mod 2: group 0 gets the long ones (several prefill chunks),
    # group 1 the short ones, so group 1 runs out of work while group 0 still computes.
    rng = random.Random(11)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (31, 3, 40, 5, 23)]


def test_dp_attention_matches_transformers_with_an_idle_group(tiny_llama_dir, prompts, tmp_path):
    reference = hf_greedy(tiny_llama_dir, prompts, NEW_TOKENS)
    flags = ("--dp-size", "2", "--enable-dp-attention", "--chunked-prefill-size", "8")
    outputs, idle_steps = dp_generate(tiny_llama_dir, 2, prompts, NEW_TOKENS, tmp_path, flags)
    assert outputs == reference
    assert idle_steps[0] == 0 and idle_steps[1] > 0, idle_steps


def test_dp_attention_over_attention_tp_groups(tiny_qwen3_dir, prompts, tmp_path):
    """--tp 4 --dp-size 2: attention tensor-parallel over 2 ranks within each DP group (2 KV heads
    split), the MLP over all 4."""
    reference = hf_greedy(tiny_qwen3_dir, prompts, NEW_TOKENS)
    flags = ("--dp-size", "2", "--enable-dp-attention", "--chunked-prefill-size", "8")
    outputs, idle_steps = dp_generate(tiny_qwen3_dir, 4, prompts, NEW_TOKENS, tmp_path, flags)
    assert outputs == reference
    assert idle_steps[1] > 0, idle_steps


def test_served_over_http(start_server, tiny_llama_dir):
    """A real server: two DP-group leaders, each with its own link to the main process, in step at
    every forward; 32 concurrent requests of uneven lengths dealt to both groups (each group idle
    at times while the other works) neither hang nor differ from transformers'."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.cluster_nodes import generate

    rng = random.Random(7)
    prompts = [[rng.randrange(3, 49152) for _ in range(rng.choice((2, 5, 9, 30, 47)))] for _ in range(32)]
    reference = hf_greedy(tiny_llama_dir, prompts, NEW_TOKENS)
    server = start_server("--model-path", str(tiny_llama_dir), "--tp", "2", "--dp-size", "2",
                          "--enable-dp-attention", "--chunked-prefill-size", "8")
    with ThreadPoolExecutor(len(prompts)) as pool:
        assert list(pool.map(lambda p: generate(server, p, NEW_TOKENS), prompts)) == reference
    assert len(server.scheduler_pids()) == 2
    assert "the LM head is split within each DP group" in server.log()


@pytest.mark.parametrize("arch,a2a", [("mixtral", "none"), ("qwen3_moe", "none"), ("deepseek_v3", "deepep")])
def test_moe_under_dp_attention_with_expert_parallelism(request, arch, a2a, prompts, tmp_path):
    """The issue's shape --tp 2 --dp-size 2 --enable-dp-attention --ep 2 --enable-dp-lm-head: the
    MoE block receives both DP groups' tokens and runs as under plain tensor/expert parallelism."""
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    reference = hf_greedy(model_dir, prompts, NEW_TOKENS)
    flags = ("--dp-size", "2", "--enable-dp-attention", "--ep", "2", "--enable-dp-lm-head",
             "--moe-a2a-backend", a2a, "--chunked-prefill-size", "8")
    outputs, idle_steps = dp_generate(model_dir, 2, prompts, NEW_TOKENS, tmp_path, flags)
    assert outputs == reference
    assert idle_steps[1] > 0, idle_steps
