"""The real Scheduler over a model-free runner (tests/fake_runner.py): chunked prefill, radix
reuse, retraction, abort, overlap and mixed chunks give exactly the fake model's output, and the
KV accounting fixture (tests/conftest.py) checks every slot after each test. Milliseconds each,
so scheduler bugs fail here before any model loads."""

from __future__ import annotations

import random

import pytest

from meshserve.executor.forward_batch import ForwardMode
from meshserve.messages import GenerateReq
from tests.fake_runner import expected_output, fake_scheduler
from tests.scheduler_driver import check_kv_accounting, greedy, output_ids, run_to_completion


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(5)
    prompts = [[rng.randrange(1, 97) for _ in range(n)] for n in (3, 9, 17, 30, 41)]
    prompts.append(prompts[4][:25] + [7, 8, 9])  # shares a 25-token prefix with prompt 4
    return prompts


CONFIGS = {
    "default": ((), {}),
    "chunked-4": (("--chunked-prefill-size", "4"), {}),
    "chunked-no-radix": (("--chunked-prefill-size", "6", "--disable-radix-cache", "--schedule-policy", "fcfs"), {}),
    "chunked-overlap": (("--chunked-prefill-size", "5", "--enable-overlap-schedule"), {}),
    "chunked-mixed": (("--chunked-prefill-size", "4", "--enable-mixed-chunk"), {}),
    # 90 slots for 6 sequences of up to 41 + 20 tokens: evicts and retracts.
    "kv-pressure": ((), {"max_total_tokens": 90}),
    "kv-pressure-chunked-overlap": (("--chunked-prefill-size", "7", "--enable-overlap-schedule"),
                                    {"max_total_tokens": 90}),
    "kv-pressure-no-radix": (("--disable-radix-cache",), {"max_total_tokens": 90}),
    "backlog": (("--enable-overlap-schedule",), {"max_running_requests": 2}),
    # Admission reserving nothing for future tokens (forced below): decode must retract.
    "retract": ((), {"max_total_tokens": 90}),
    "retract-overlap": (("--enable-overlap-schedule",), {"max_total_tokens": 90}),
    "retract-no-radix": (("--disable-radix-cache",), {"max_total_tokens": 64}),
    # KV pages of 4 (3) tokens: page-aligned cache matches, partial last pages, chunk boundaries
    # inside a page, decode steps that fill a page before taking the next.
    "page-4": (("--page-size", "4"), {}),
    "page-4-chunked-overlap": (("--page-size", "4", "--chunked-prefill-size", "5", "--enable-overlap-schedule"), {}),
    "page-4-chunked-mixed": (("--page-size", "4", "--chunked-prefill-size", "6", "--enable-mixed-chunk"), {}),
    "page-3-chunked-no-radix": (("--page-size", "3", "--chunked-prefill-size", "7", "--disable-radix-cache"), {}),
    "page-4-kv-pressure-chunked": (("--page-size", "4", "--chunked-prefill-size", "7"), {"max_total_tokens": 96}),
    "retract-page-4": (("--page-size", "4"), {"max_total_tokens": 96}),
    "retract-page-4-overlap": (("--page-size", "4", "--enable-overlap-schedule"), {"max_total_tokens": 96}),
    "retract-page-3-no-radix": (("--page-size", "3", "--disable-radix-cache"), {"max_total_tokens": 66}),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_outputs_are_the_fake_models_in_every_mode(name, prompts):
    extra, sizes = CONFIGS[name]
    scheduler = fake_scheduler(*extra, **sizes)
    if name.startswith("retract"):
        scheduler.new_token_ratio = 0.0
    new_tokens = [20, 5, 12, 20, 8, 15]
    for round_ in range(2):  # the second round is served from the radix cache (when on)
        outs = run_to_completion(scheduler, {f"{round_}-{i}": (p, greedy(n)) for i, (p, n) in
                                             enumerate(zip(prompts, new_tokens))})
        for i, (p, n) in enumerate(zip(prompts, new_tokens)):
            assert output_ids(outs[f"{round_}-{i}"]) == expected_output(p, n), (round_, i)
        check_kv_accounting(scheduler)
    if name.startswith("retract"):
        assert scheduler.stats["num_retracted"] > 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_repeated_prompt_is_a_cache_hit_until_the_flush(prompts, page_size):
    """Catches a prefix match off by one (the last prompt token must be recomputed to get its
    logits; with pages, the hit is the whole pages of the rest) and a /flush_cache that does nothing."""
    scheduler = fake_scheduler("--page-size", str(page_size))
    prompt = prompts[3]
    run_to_completion(scheduler, {"a": (prompt, greedy(3))})
    hit = run_to_completion(scheduler, {"b": (prompt, greedy(3))})["b"]
    assert hit[-1].cached_tokens == (len(prompt) - 1) // page_size * page_size
    assert output_ids(hit) == expected_output(prompt, 3)
    assert scheduler.cache.total_size > 0
    assert scheduler.flush_cache() == (True, "")
    assert scheduler.pool.num_free == scheduler.pool.size and scheduler.cache.total_size == 0
    miss = run_to_completion(scheduler, {"c": (prompt, greedy(3))})["c"]
    assert miss[-1].cached_tokens == 0 and output_ids(miss) == expected_output(prompt, 3)


def test_flush_is_refused_while_requests_run(prompts):
    scheduler = fake_scheduler()
    scheduler.add_request(GenerateReq(rid="a", input_ids=prompts[2], sampling=greedy(10)))
    scheduler.step()
    ok, message = scheduler.flush_cache()
    assert not ok and "in flight" in message
    check_kv_accounting(scheduler)
    while scheduler.has_work:
        scheduler.step()


@pytest.mark.parametrize("extra", [(), ("--enable-overlap-schedule",), ("--chunked-prefill-size", "4"),
                                   ("--page-size", "4", "--chunked-prefill-size", "3", "--enable-overlap-schedule")],
                         ids=["lockstep", "overlap", "chunked", "page-4-chunked-overlap"])
def test_abort_at_every_step_returns_every_slot(prompts, extra):
    """Abort one request after each possible number of steps (mid-chunk, mid-decode, with a step
    in flight): the others still get the fake model's output and no slot is lost."""
    for abort_after in range(0, 14, 2):
        scheduler = fake_scheduler(*extra)
        for i, p in enumerate(prompts[:3]):
            scheduler.add_request(GenerateReq(rid=str(i), input_ids=p, sampling=greedy(8)))
        outs: dict[str, list] = {"0": [], "1": [], "2": []}
        for step in range(10_000):
            if step == abort_after:
                scheduler.abort("1", "client went away")
            if not scheduler.has_work:
                break
            scheduler.step()
            for out in scheduler.take_outputs():
                outs[out.rid].append(out)
            check_kv_accounting(scheduler)
        for out in scheduler.take_outputs():
            outs[out.rid].append(out)
        assert outs["1"][-1].finish.kind == "abort" or output_ids(outs["1"]) == expected_output(prompts[1], 8)
        assert [output_ids(outs["0"]), output_ids(outs["2"])] == [expected_output(prompts[0], 8),
                                                                   expected_output(prompts[2], 8)]


@pytest.mark.parametrize("page_size", [1, 3])
def test_chunked_prefill_holds_no_slot_beyond_its_tokens(prompts, page_size):
    """Between chunks, the KV in use is exactly the pages of the tokens computed so far: a chunk
    that ends inside a page keeps that page (the next chunk fills it), and takes no other."""
    scheduler = fake_scheduler("--chunked-prefill-size", "4", "--page-size", str(page_size))
    prompt = prompts[4]
    scheduler.add_request(GenerateReq(rid="a", input_ids=prompt, sampling=greedy(2)))
    computed = 0
    while scheduler.chunked is not None or computed == 0:
        scheduler.step()
        computed = min(computed + 4, len(prompt))
        check_kv_accounting(scheduler)
        assert scheduler.pool.size - scheduler.pool.num_free == -(-computed // page_size) * page_size
    while scheduler.has_work:
        scheduler.step()
    assert output_ids(scheduler.take_outputs()) == expected_output(prompt, 2)


def test_a_mixed_step_decays_the_new_token_ratio_as_a_decode_step(prompts):
    """--enable-mixed-chunk: a prefill step that carries the running sequences gives each a token,
    as a decode step does, so it lowers the admission reserve's ratio as much (else the reserve
    stays at its start while prompts keep arriving); a step of prompts alone does not. The
    decodes ride after the prompts, one token each."""
    from meshserve.scheduler.scheduler import INIT_NEW_TOKEN_RATIO

    scheduler = fake_scheduler("--chunked-prefill-size", "4", "--enable-mixed-chunk")
    forward = scheduler.runner.forward
    steps = []
    scheduler.runner.forward = lambda step: steps.append(step) or forward(step)
    scheduler.add_request(GenerateReq(rid="a", input_ids=prompts[0], sampling=greedy(30)))
    scheduler.step()  # a's 3-token prompt, alone
    assert scheduler.new_token_ratio == INIT_NEW_TOKEN_RATIO
    scheduler.add_request(GenerateReq(rid="b", input_ids=prompts[4], sampling=greedy(2)))
    (a,) = scheduler.running
    for chunk in range(1, 11):  # b's 41 tokens in chunks of 4: 11 steps, each carrying a's decode
        scheduler.step()
        last = steps[-1]
        assert last.mode is ForwardMode.EXTEND and last.extend_lens == [4, 1] and last.req_rows[-1] == a.row
        assert len(a.output_ids) == 1 + chunk
        # 0.001 a step at the default --schedule-conservativeness, as before the flag existed.
        assert scheduler.new_token_ratio == pytest.approx(INIT_NEW_TOKEN_RATIO - chunk * 0.001)
    while scheduler.has_work:
        scheduler.step()
    outs = {}
    for out in scheduler.take_outputs():
        outs.setdefault(out.rid, []).append(out)
    assert output_ids(outs["a"]) == expected_output(prompts[0], 30)
    assert output_ids(outs["b"]) == expected_output(prompts[4], 2)


@pytest.mark.parametrize(("conservativeness", "admitted"), [("2.0", 3), ("1.0", 4), ("0.3", 8)])
def test_conservativeness_sets_how_many_prompts_one_step_admits(conservativeness, admitted):
    """--schedule-conservativeness scales the KV kept back for what admitted requests may still
    generate. 8 prompts of 10 tokens with 100 to generate, 399 allocatable slots (page 0 is
    reserved): the k-th is admitted while 399 - 10(k - 1) >= 10 + k × int(100 × ratio) + 1, so
    ratio 1.0 (2 × 0.7, capped) admits 3, 0.7 admits 4 and 0.21 all 8. Ignoring the flag
    would admit 4 in every case."""
    scheduler = fake_scheduler("--schedule-conservativeness", conservativeness, max_total_tokens=400,
                               max_running_requests=16)
    for i in range(8):
        scheduler.add_request(GenerateReq(rid=str(i), input_ids=[3 + i] * 10, sampling=greedy(100)))
    scheduler.step()
    assert len(scheduler.running) == admitted and len(scheduler.waiting) == 8 - admitted
    while scheduler.has_work:
        scheduler.step()
    outs: dict[str, list] = {}
    for out in scheduler.take_outputs():
        outs.setdefault(out.rid, []).append(out)
    assert all(output_ids(outs[str(i)]) == expected_output([3 + i] * 10, 100) for i in range(8))


@pytest.mark.parametrize(("conservativeness", "init", "floor"), [(1.0, 0.7, 0.1), (0.5, 0.35, 0.05), (2.0, 1.0, 0.2)])
def test_conservativeness_scales_the_ratios_start_and_floor(conservativeness, init, floor):
    """The ratio decays from its start to its floor in 600 decoding steps whatever the scaling
    (0.001 a step at the default); the start is capped at 1 (all of a request's tokens left)."""
    from meshserve.scheduler.scheduler import NewTokenRatioBounds

    bounds = NewTokenRatioBounds.scaled(conservativeness)
    assert (bounds.init, bounds.floor) == (pytest.approx(init), pytest.approx(floor))
    assert bounds.decay == pytest.approx((init - floor) / 600)
    scheduler = fake_scheduler("--schedule-conservativeness", str(conservativeness), max_total_tokens=4096)
    assert scheduler.new_token_ratio == pytest.approx(init)
    run_to_completion(scheduler, {"a": ([5] * 4, greedy(400))})  # 399 decode steps: not at the floor yet
    assert scheduler.new_token_ratio == pytest.approx(init - 399 * bounds.decay)
    run_to_completion(scheduler, {"b": ([6] * 4, greedy(400))})  # 399 more, past the floor
    assert scheduler.new_token_ratio == pytest.approx(floor)
