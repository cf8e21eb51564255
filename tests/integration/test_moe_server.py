"""Real server processes over HTTP with the official openai client: the tiny DeepSeek-V3 (latent
attention, grouped sigmoid routing with the correction bias, dense first layer), and the tiny
Qwen3-MoE on two expert-parallel ranks with redundant experts and EPLB rebalancing during the
requests: greedy completions are transformers' greedy continuations of the same prompts, and
/metrics reports the expert loads per expert and per expert-parallel rank."""

from __future__ import annotations

import random
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from tests.hf_reference import hf_greedy

NEW_TOKENS = 12


def test_deepseek_v3_server_matches_transformers(start_server, tiny_deepseek_v3_dir):
    rng = random.Random(13)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (6, 31)]
    server = start_server("--model-path", str(tiny_deepseek_v3_dir))
    client = server.openai()
    model = client.models.list().data[0].id
    # Concurrent in the server (one request each, batched by the scheduler as they arrive).
    texts = [client.completions.create(model=model, prompt=p, max_tokens=NEW_TOKENS, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_deepseek_v3_dir))
    expected = [tokenizer.decode(ids) for ids in hf_greedy(tiny_deepseek_v3_dir, prompts, NEW_TOKENS)]
    assert texts == expected


def _samples(metrics_text: str, name: str) -> dict[str, float]:
    """One metric's samples by their distinguishing label (expert, ep_rank) or ""."""
    return {s.labels.get("expert", s.labels.get("ep_rank", "")): s.value
            for family in text_string_to_metric_families(metrics_text) for s in family.samples if s.name == name}


def test_eplb_server_matches_transformers_and_reports_expert_loads(start_server, tiny_qwen3_moe_dir):
    rng = random.Random(17)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (9, 26)]
    server = start_server("--model-path", str(tiny_qwen3_moe_dir), "--tp", "2", "--ep", "2",
                          "--ep-num-redundant-experts", "2", "--enable-eplb", "--eplb-rebalance-num-iterations", "3")
    client = server.openai()
    model = client.models.list().data[0].id
    texts = [client.completions.create(model=model, prompt=p, max_tokens=NEW_TOKENS, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text for p in prompts]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_qwen3_moe_dir))
    assert texts == [tokenizer.decode(ids) for ids in hf_greedy(tiny_qwen3_moe_dir, prompts, NEW_TOKENS)]
    # One MoE layer (decoder_sparse_step 2) × top-2 = 2 pairs per forwarded token: our prompts,
    # then one token per decode step, and the start-up warm-up generation's (a short prompt, 4
    # tokens). Once the server is idle the totals are exact; the scheduler reports them once a
    # second, so wait until a report from after our requests: two reports alike, all counted.
    ours = sum(map(len, prompts)) + len(prompts) * (NEW_TOKENS - 1)
    deadline = time.monotonic() + 15
    text = httpx.get(f"{server.base_url}/metrics").text
    while True:
        time.sleep(1.2)
        previous, text = text, httpx.get(f"{server.base_url}/metrics").text
        pairs = sum(_samples(text, "meshserve:expert_tokens_total").values())
        if (previous == text and pairs > 2 * ours) or time.monotonic() > deadline:
            break
    assert _samples(text, "meshserve:eplb_rebalances_total")[""] >= 7  # the 22 decode steps alone make 7
    assert _samples(text, "meshserve:eplb_moved_experts_total")[""] > 0
    experts = _samples(text, "meshserve:expert_tokens_total")
    ranks = _samples(text, "meshserve:ep_rank_tokens_total")
    assert sorted(experts, key=int) == [str(e) for e in range(8)] and sorted(ranks) == ["0", "1"]
    assert min(ranks.values()) > 0
    assert pairs == sum(ranks.values()) and pairs % 2 == 0
    assert 2 * ours < pairs <= 2 * (ours + 16)
