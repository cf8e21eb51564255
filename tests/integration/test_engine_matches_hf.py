"""Greedy generations of the real engine equal Hugging Face transformers token for token —
fresh, from the radix cache, with chunked prefill forced small, under KV pressure (retraction)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from tests.hf_reference import hf_greedy
from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain what a neural network is in one sentence.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def chat_prompt_ids(default_model_dir) -> list[list[int]]:
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    return [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False) for p in CHAT_PROMPTS]


@pytest.fixture(scope="module")
def default_reference(default_model_dir, chat_prompt_ids) -> list[list[int]]:
    return hf_greedy(default_model_dir, chat_prompt_ids, NEW_TOKENS)


def _generate(model_dir, prompts, new_tokens, *extra, rounds=1) -> list[list[list[int]]]:
    """`rounds` submissions of all prompts to one scheduler; later rounds hit the radix cache."""
    scheduler = build_scheduler(model_dir, *extra)
    results = []
    for r in range(rounds):
        outs = run_to_completion(scheduler, {f"{r}-{i}": (p, greedy(new_tokens)) for i, p in enumerate(prompts)})
        results.append([output_ids(outs[f"{r}-{i}"]) for i in range(len(prompts))])
    return results


@pytest.mark.parametrize("extra", [
    (),
    ("--chunked-prefill-size", "7"),
    ("--disable-radix-cache",),
], ids=["default", "chunked-7", "no-radix"])
def test_default_model_matches_transformers(default_model_dir, chat_prompt_ids, default_reference, extra):
    first, second = _generate(default_model_dir, chat_prompt_ids, NEW_TOKENS, *extra, rounds=2)
    assert first == default_reference
    assert second == default_reference  # second round: prefixes served from the radix cache


def test_radix_cache_hit_is_reported(default_model_dir, chat_prompt_ids):
    scheduler = build_scheduler(default_model_dir)
    prompt = chat_prompt_ids[0]
    run_to_completion(scheduler, {"a": (prompt, greedy(4))})
    outs = run_to_completion(scheduler, {"b": (prompt, greedy(4))})
    assert outs["b"][-1].cached_tokens == len(prompt) - 1  # all but the last token came from the cache


@pytest.fixture(scope="module")
def tiny_prompts() -> list[list[int]]:
    import random

    rng = random.Random(7)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (3, 11, 29, 64)]
    prompts.append(prompts[3][:40] + [5, 6, 7])  # shares a 40-token prefix with the previous prompt
    return prompts


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2"])
@pytest.mark.parametrize("extra", [
    (),
    ("--chunked-prefill-size", "5"),
    # 120 slots for 5 sequences of up to 64+24 tokens: forces eviction and retraction.
    ("--max-total-tokens", "120"),
    ("--max-total-tokens", "120", "--disable-radix-cache", "--chunked-prefill-size", "16", "--schedule-policy", "fcfs"),
], ids=["default", "chunked-5", "kv-pressure", "kv-pressure-no-radix"])
def test_tiny_models_match_transformers(request, arch, extra, tiny_prompts):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    reference = hf_greedy(model_dir, tiny_prompts, 24)
    first, second = _generate(model_dir, tiny_prompts, 24, *extra, rounds=2)
    assert first == reference
    assert second == reference


def test_optimistic_admission_retracts_and_stays_exact(tiny_qwen3_dir, tiny_prompts):
    """When the admission estimate is too optimistic (forced here), decode runs out of KV and
    retracts sequences; their outputs are still exactly the reference."""
    scheduler = build_scheduler(tiny_qwen3_dir, "--max-total-tokens", "120")
    scheduler.new_token_ratio = 0.0  # reserve nothing for future tokens: over-admit on purpose
    outs = run_to_completion(scheduler, {str(i): (p, greedy(24)) for i, p in enumerate(tiny_prompts)})
    assert scheduler.stats["num_retracted"] > 0
    assert [output_ids(outs[str(i)]) for i in range(len(tiny_prompts))] == hf_greedy(tiny_qwen3_dir, tiny_prompts, 24)
    # Nothing leaked: every slot is free or held by the (unlocked) prefix cache.
    assert scheduler.pool.num_free + scheduler.cache.evictable_size == scheduler.pool.size


def test_admission_reserves_room_for_future_tokens(tiny_qwen3_dir, tiny_prompts):
    scheduler = build_scheduler(tiny_qwen3_dir, "--max-total-tokens", "120")
    run_to_completion(scheduler, {str(i): (p, greedy(24)) for i, p in enumerate(tiny_prompts)})
    assert scheduler.stats["num_retracted"] == 0


def test_sharded_checkpoint_matches_transformers(tmp_path, default_model_dir, tiny_prompts):
    from tests.models import make_tiny_qwen3

    model_dir = make_tiny_qwen3(tmp_path / "sharded", sharded=True, tokenizer_dir=default_model_dir)
    assert (model_dir / "model.safetensors.index.json").is_file()
    first, = _generate(model_dir, tiny_prompts, 8)
    assert first == hf_greedy(model_dir, tiny_prompts, 8)


def test_stream_interval_batches_reports(tiny_qwen3_dir, tiny_prompts):
    scheduler = build_scheduler(tiny_qwen3_dir, "--stream-interval", "5")
    outs = run_to_completion(scheduler, {"a": (tiny_prompts[0], greedy(12))})
    assert [len(o.new_ids) for o in outs["a"]] == [5, 5, 2]
    assert output_ids(outs["a"]) == hf_greedy(tiny_qwen3_dir, tiny_prompts[:1], 12)[0]
