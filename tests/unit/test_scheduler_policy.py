"""PrefillPolicy (order and token budget) and FinishChecker (why a sequence ends), without a
model: the scheduler's decisions that no output comparison pins down on its own."""

from __future__ import annotations

import pytest
import torch

from meshserve.cache.kv_pool import KVPool
from meshserve.cache.radix_cache import NoPrefixCache, RadixCache
from meshserve.messages import FinishReason, GenerateReq
from meshserve.sampling_params import SamplingParams
from meshserve.scheduler.finish import FinishChecker
from meshserve.scheduler.policy import LPM_MAX_QUEUE, PrefillPolicy
from meshserve.scheduler.request import Req


def req(rid: str, input_ids: list[int], output_ids: list[int] = (), context_length: int = 100, **sampling) -> Req:
    params = SamplingParams(**{"max_new_tokens": 8, "temperature": 0.0, **sampling})
    r = Req.from_message(GenerateReq(rid=rid, input_ids=list(input_ids), sampling=params), context_length)
    r.output_ids = list(output_ids)
    return r


def cache_with(*sequences: list[int]) -> RadixCache:
    pool = KVPool(size=256, num_layers=1, num_kv_heads=1, head_dim=1, dtype=torch.float32,
                  device=torch.device("cpu"))
    cache = RadixCache(pool)
    for tokens in sequences:
        cache.insert(tokens, pool.alloc(len(tokens)))
    return cache


# --- PrefillPolicy ----------------------------------------------------------------------------


def test_lpm_puts_the_longest_cached_prefix_first_and_keeps_arrival_order_on_ties():
    cache = cache_with([1, 2, 3, 4, 5, 6], [9, 9])
    waiting = [req("none", [7, 7, 7]), req("short", [9, 9, 9]), req("long", [1, 2, 3, 4, 5, 6, 0]),
               req("none2", [8, 8])]
    order = PrefillPolicy(schedule_policy="lpm", max_prefill_tokens=100, chunked_prefill_size=None).order(
        waiting, cache)
    assert [r.rid for r in order] == ["long", "short", "none", "none2"]


def test_retracted_requests_go_first_whatever_their_match():
    cache = cache_with([1, 2, 3, 4])
    waiting = [req("hit", [1, 2, 3, 4, 5]), req("retracted", [6, 6], output_ids=[3])]
    order = PrefillPolicy(schedule_policy="lpm", max_prefill_tokens=100, chunked_prefill_size=None).order(
        waiting, cache)
    assert [r.rid for r in order] == ["retracted", "hit"]


def test_lof_puts_the_most_tokens_left_first_after_retracted_requests():
    cache = cache_with([1, 2, 3, 4])
    waiting = [req("short", [1, 2, 3, 4, 5], max_new_tokens=3), req("long", [6], max_new_tokens=50),
               req("capped", [7] * 95, max_new_tokens=50),  # context 100: 5 tokens left, not 50
               req("tie", [8], max_new_tokens=50), req("retracted", [9], output_ids=[1], max_new_tokens=4)]
    order = PrefillPolicy(schedule_policy="lof", max_prefill_tokens=100, chunked_prefill_size=None).order(
        waiting, cache)
    assert [r.rid for r in order] == ["retracted", "long", "tie", "capped", "short"]


@pytest.mark.parametrize("case", ["fcfs", "no-radix", "long-queue"])
def test_arrival_order_when_lpm_does_not_apply(case):
    cache = cache_with([1, 2, 3]) if case != "no-radix" else NoPrefixCache(None)  # type: ignore[arg-type]
    n = LPM_MAX_QUEUE + 1 if case == "long-queue" else 3
    waiting = [req(str(i), [5, 5] if i % 2 else [1, 2, 3, 4]) for i in range(n)]
    policy = PrefillPolicy(schedule_policy="fcfs" if case == "fcfs" else "lpm", max_prefill_tokens=100,
                           chunked_prefill_size=None)
    assert policy.order(waiting, cache) == waiting


def test_budget_without_chunking_takes_whole_prompts_but_always_the_first():
    budget = PrefillPolicy(schedule_policy="fcfs", max_prefill_tokens=10, chunked_prefill_size=None).new_budget()
    assert budget.take(25) == 25  # the first prompt of a step, however long: no starvation
    budget.spend(25)
    assert budget.exhausted and budget.take(1) == 0
    budget = PrefillPolicy(schedule_policy="fcfs", max_prefill_tokens=10, chunked_prefill_size=None).new_budget()
    assert budget.take(6) == 6
    budget.spend(6)
    assert budget.take(5) == 0 and budget.take(4) == 4  # whole or nothing


def test_chunked_budget_is_the_smaller_limit_and_cuts_prompts():
    policy = PrefillPolicy(schedule_policy="fcfs", max_prefill_tokens=10, chunked_prefill_size=4)
    budget = policy.new_budget()
    assert budget.take(9) == 4
    budget.spend(4)
    assert budget.exhausted
    budget = PrefillPolicy(schedule_policy="fcfs", max_prefill_tokens=3, chunked_prefill_size=8).new_budget()
    assert budget.take(9) == 3


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown schedule policy"):
        PrefillPolicy(schedule_policy="random", max_prefill_tokens=1, chunked_prefill_size=None)


# --- FinishChecker ----------------------------------------------------------------------------


class CharTokenizer:
    """Token t decodes to chr(ord('a') + t % 26): enough for stop strings."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return "".join(chr(ord("a") + t % 26) for t in ids)


def checker() -> FinishChecker:
    return FinishChecker(eos_token_ids=(2,), tokenizer=CharTokenizer())


def finish_after(r: Req, new_tokens: list[int], check: FinishChecker | None = None) -> list[FinishReason | None]:
    """The checker's verdict after each appended token."""
    check = check or checker()
    verdicts = []
    for t in new_tokens:
        r.output_ids.append(t)
        verdicts.append(check.check(r))
    return verdicts


def test_max_new_tokens_ends_exactly_at_the_limit():
    verdicts = finish_after(req("a", [5], max_new_tokens=3), [10, 11, 12])
    assert verdicts == [None, None, FinishReason("length")]


def test_eos_stops_unless_ignored_and_only_after_min_new_tokens():
    assert finish_after(req("a", [5]), [10, 2]) == [None, FinishReason("stop", matched=2)]
    assert finish_after(req("a", [5], ignore_eos=True), [10, 2]) == [None, None]
    assert finish_after(req("a", [5], min_new_tokens=3), [2, 2, 2]) == [None, None, FinishReason("stop", matched=2)]


def test_stop_token_ids():
    assert finish_after(req("a", [5], stop_token_ids=[7]), [10, 7]) == [None, FinishReason("stop", matched=7)]


def test_stop_strings_match_across_tokens_and_the_earliest_ending_wins():
    # tokens 7, 4, 11 decode to "h", "e", "l"
    verdicts = finish_after(req("a", [5], stop=["hel", "el"]), [0, 7, 4, 11])
    assert verdicts == [None, None, None, FinishReason("stop", matched="hel")]  # both end at "l": first listed
    assert finish_after(req("a", [5], stop=["lx", "he"]), [7, 4]) == [None, FinishReason("stop", matched="he")]
    assert finish_after(req("a", [5], stop=["xyz"]), [0, 7, 4]) == [None, None, None]


def test_context_length_ends_the_sequence():
    verdict = finish_after(req("a", [5] * 9, context_length=10, max_new_tokens=50), [10])
    assert verdict[0] is not None and verdict[0].kind == "length" and "context" in (verdict[0].message or "")
