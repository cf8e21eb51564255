"""Greedy generations of the real engine equal Hugging Face transformers token for token —
fresh, from the radix cache, with chunked prefill forced small, under KV pressure (retraction),
with a decode step in flight (--enable-overlap-schedule), with decodes inside prefill steps
(--enable-mixed-chunk), with KV pages of several tokens (--page-size)."""

from __future__ import annotations

import pytest
from tests.hf_reference import DEFAULT_MODEL_NEW_TOKENS as NEW_TOKENS
from tests.hf_reference import default_model_reference, hf_greedy
from tests.scheduler_driver import build_scheduler, greedy, output_ids, run_to_completion

@pytest.fixture(scope="module")
def chat_prompt_ids() -> list[list[int]]:
    return default_model_reference().chat_prompt_ids


@pytest.fixture(scope="module")
def default_reference() -> list[list[int]]:
    """transformers on the GGUF file itself (not on meshserve's converted directory)."""
    return default_model_reference().chat_outputs


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
    ("--enable-overlap-schedule",),
    ("--enable-mixed-chunk", "--chunked-prefill-size", "7", "--enable-overlap-schedule"),
    ("--page-size", "16", "--chunked-prefill-size", "7"),  # chunk boundaries inside pages
    ("--page-size", "4", "--disable-radix-cache", "--enable-overlap-schedule"),
], ids=["default", "chunked-7", "no-radix", "overlap", "mixed-chunk-overlap", "page-16-chunked-7",
        "page-4-no-radix-overlap"])
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
    ("--max-total-tokens", "120", "--enable-overlap-schedule", "--schedule-policy", "lof"),
    ("--max-running-requests", "2", "--enable-overlap-schedule"),  # a backlog waits while steps overlap
    ("--chunked-prefill-size", "5", "--enable-mixed-chunk"),
    ("--max-total-tokens", "120", "--chunked-prefill-size", "9", "--enable-mixed-chunk"),
    ("--page-size", "4", "--max-total-tokens", "120"),
    ("--page-size", "8", "--max-total-tokens", "128", "--disable-radix-cache", "--chunked-prefill-size", "5"),
    ("--page-size", "4", "--chunked-prefill-size", "6", "--enable-mixed-chunk", "--enable-overlap-schedule"),
], ids=["default", "chunked-5", "kv-pressure", "kv-pressure-no-radix", "kv-pressure-overlap-lof", "backlog-overlap",
        "mixed-chunk", "kv-pressure-mixed-chunk", "page-4-kv-pressure", "page-8-kv-pressure-no-radix-chunked",
        "page-4-mixed-chunk-overlap"])
def test_tiny_models_match_transformers(request, arch, extra, tiny_prompts):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    reference = hf_greedy(model_dir, tiny_prompts, 24)
    first, second = _generate(model_dir, tiny_prompts, 24, *extra, rounds=2)
    assert first == reference
    assert second == reference


@pytest.mark.parametrize("extra", [(), ("--enable-overlap-schedule",), ("--page-size", "4"),
                                   ("--page-size", "4", "--enable-overlap-schedule")],
                         ids=["lockstep", "overlap", "page-4", "page-4-overlap"])
def test_optimistic_admission_retracts_and_stays_exact(tiny_qwen3_dir, tiny_prompts, extra):
    """When the admission estimate is too optimistic (forced here), decode runs out of KV and
    retracts sequences (with overlap: sequences whose token is still in flight); their outputs
    are still exactly the reference."""
    scheduler = build_scheduler(tiny_qwen3_dir, "--max-total-tokens", "120", *extra)
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


def test_overlap_schedule_matches_lockstep_with_mixed_sampling(tiny_qwen3_dir, tiny_prompts):
    """One decode step in flight gives the same tokens and finish reasons as lockstep decoding
    for greedy, seeded, penalised, min_new_tokens and stop-token requests in one batch."""
    from meshserve.sampling_params import SamplingParams

    stop_at = run_to_completion(build_scheduler(tiny_qwen3_dir), {"x": (tiny_prompts[4], greedy(8))})
    stop_token = output_ids(stop_at["x"])[5]
    # Every row overlaps: the seeded, penalised and min_new_tokens rows count their in-flight
    # token (penalties by its value, counted on the device when it was sampled).
    # Unpenalised, prompt 1's greedy output repeats its newest token: the penalty must see the
    # in-flight token to prevent that.
    params = [greedy(20), SamplingParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.3,
                                         frequency_penalty=5.0),
              SamplingParams(max_new_tokens=14, temperature=0.8, seed=3),
              SamplingParams(max_new_tokens=9, temperature=0.0, min_new_tokens=5),
              SamplingParams(max_new_tokens=20, temperature=0.0, stop_token_ids=[stop_token])]
    requests = {str(i): (p, params[i]) for i, p in enumerate(tiny_prompts)}
    lockstep = run_to_completion(build_scheduler(tiny_qwen3_dir), requests)
    overlapped = run_to_completion(build_scheduler(tiny_qwen3_dir, "--enable-overlap-schedule"), requests)
    assert {r: output_ids(o) for r, o in overlapped.items()} == {r: output_ids(o) for r, o in lockstep.items()}
    assert {r: o[-1].finish for r, o in overlapped.items()} == {r: o[-1].finish for r, o in lockstep.items()}
    assert len(output_ids(overlapped["4"])) == 6  # stopped at the stop token, not one step later


@pytest.mark.parametrize("extra", [(), ("--enable-overlap-schedule",)], ids=["lockstep", "overlap"])
def test_penalised_greedy_matches_a_reference_loop(tiny_qwen3_dir, tiny_prompts, extra):
    """Repetition, frequency and presence penalties over the output so far, against a plain loop
    over transformers' logits. Prompt 1's unpenalised greedy output repeats its newest token, so
    a count that misses any token (the one in flight, under overlap) changes the output."""
    import torch

    from meshserve.sampling_params import SamplingParams
    from tests.hf_reference import load_hf_model

    rep, freq, pres, new_tokens = 1.3, 0.7, 0.2, 16
    prompt = tiny_prompts[1]
    model = load_hf_model(tiny_qwen3_dir)
    expected: list[int] = []
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model(torch.tensor([prompt + expected])).logits[0, -1].float()
            counts = torch.bincount(torch.tensor(expected, dtype=torch.long), minlength=logits.shape[0]).float()
            seen = counts > 0
            logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
            expected.append(int((logits - freq * counts - pres * seen.float()).argmax()))
    assert expected != hf_greedy(tiny_qwen3_dir, [prompt], new_tokens)[0]  # the penalties matter here

    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True, repetition_penalty=rep,
                            frequency_penalty=freq, presence_penalty=pres)
    scheduler = build_scheduler(tiny_qwen3_dir, *extra)
    outs = run_to_completion(scheduler, {"p": (prompt, params), "g": (prompt, greedy(8))})
    assert output_ids(outs["p"]) == expected
    assert scheduler.penalty_counts.num_rows_held == 0  # released when the request finished


def test_abort_while_a_step_is_in_flight(tiny_qwen3_dir, tiny_prompts):
    """A request aborted while its decode step is in flight ends with the abort and nothing
    after it; its neighbours are unaffected and every KV slot comes back."""
    from meshserve.messages import GenerateReq

    scheduler = build_scheduler(tiny_qwen3_dir, "--enable-overlap-schedule")
    for i, prompt in enumerate(tiny_prompts[:3]):
        scheduler.add_request(GenerateReq(rid=str(i), input_ids=prompt, sampling=greedy(20)))
    outs: dict[str, list] = {"0": [], "1": [], "2": []}

    def step() -> None:
        scheduler.step()
        for out in scheduler.take_outputs():
            outs[out.rid].append(out)

    for _ in range(4):
        step()
    assert scheduler._in_flight is not None and any(r.rid == "1" for r in scheduler._in_flight.reqs)
    scheduler.abort("1", "the client went away")
    while scheduler.has_work:
        step()
    step()
    assert outs["1"][-1].finish.kind == "abort"
    assert output_ids(outs["1"]) == hf_greedy(tiny_qwen3_dir, tiny_prompts[1:2], 20)[0][: len(output_ids(outs["1"]))]
    assert len(output_ids(outs["1"])) < 20
    assert [output_ids(outs["0"]), output_ids(outs["2"])] == hf_greedy(tiny_qwen3_dir, tiny_prompts[0:3:2], 20)
    assert scheduler.pool.num_free + scheduler.cache.evictable_size == scheduler.pool.size


def test_mixed_chunk_decodes_during_a_long_chunked_prefill(tiny_qwen3_dir, tiny_prompts):
    """With --enable-mixed-chunk a running sequence gains a token in every step of another
    request's chunked prefill, and both outputs stay exact."""
    from meshserve.messages import GenerateReq

    scheduler = build_scheduler(tiny_qwen3_dir, "--chunked-prefill-size", "4", "--enable-mixed-chunk")
    outs: dict[str, list[int]] = {"short": [], "long": []}

    def step() -> list[int]:
        scheduler.step()
        gained = {"short": 0, "long": 0}
        for out in scheduler.take_outputs():
            outs[out.rid] += out.new_ids
            gained[out.rid] += len(out.new_ids)
        return gained["short"]

    scheduler.add_request(GenerateReq(rid="short", input_ids=tiny_prompts[0], sampling=greedy(30)))
    step()  # the short prompt's prefill: it runs from here on
    scheduler.add_request(GenerateReq(rid="long", input_ids=tiny_prompts[3], sampling=greedy(4)))
    during_prefill = [step() for _ in range(16)]  # 64 prompt tokens in chunks of 4
    assert during_prefill == [1] * 16
    while scheduler.has_work:
        step()
    assert [outs["short"], outs["long"]] == [hf_greedy(tiny_qwen3_dir, tiny_prompts[:1], 30)[0],
                                             hf_greedy(tiny_qwen3_dir, tiny_prompts[3:4], 4)[0]]
