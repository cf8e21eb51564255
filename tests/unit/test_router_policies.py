"""The router's load-balancing policies and its prefix tree, deterministic (seeded or rng-free)."""

from __future__ import annotations

import random
from collections import Counter

from meshserve.router.args import CacheAwareConfig
from meshserve.router.policies import CacheAwarePolicy, PowerOfTwoPolicy, RandomPolicy, RoundRobinPolicy
from meshserve.router.prefix_tree import PrefixTree
from meshserve.router.routing_text import routing_text
from meshserve.router.worker import CircuitBreaker, Worker


def workers(*loads: int) -> list[Worker]:
    return [Worker(f"http://w{i}", CircuitBreaker(3, 2, 5), in_flight=load) for i, load in enumerate(loads)]


def test_random_is_seeded_and_covers_every_candidate() -> None:
    pool = workers(0, 0, 0)
    picks = [RandomPolicy(random.Random(7)).select(pool, "") for _ in range(3)]
    assert picks == [RandomPolicy(random.Random(7)).select(pool, "") for _ in range(3)]
    policy = RandomPolicy(random.Random(1))
    counts = Counter(policy.select(pool, "").url for _ in range(300))
    assert set(counts) == {w.url for w in pool} and min(counts.values()) > 60


def test_round_robin_cycles_and_splits_evenly() -> None:
    pool, policy = workers(0, 0, 0), RoundRobinPolicy()
    assert [policy.select(pool, "").url for _ in range(6)] == [w.url for w in pool] * 2
    # A worker leaving the candidates does not stop the rotation over the others.
    assert Counter(policy.select(pool[:2], "").url for _ in range(10)) == {"http://w0": 5, "http://w1": 5}


def test_power_of_two_takes_the_less_loaded_of_two_draws() -> None:
    busy, idle = workers(9, 1)
    policy = PowerOfTwoPolicy(random.Random(0))
    assert all(policy.select([busy, idle], "") is idle for _ in range(20))
    # Reported load counts too: the router's own count is 0 on both, the worker says it is busy.
    a, b = workers(0, 0)
    a.reported_load = 5
    assert all(policy.select([a, b], "") is b for _ in range(20))
    # With three, the most loaded can only win if drawn twice, which sampling without
    # replacement never does.
    trio = workers(1, 2, 3)
    assert all(policy.select(trio, "").url != "http://w2" for _ in range(50))
    assert policy.select(trio[:1], "") is trio[0]


def test_cache_aware_keeps_a_prefix_on_its_worker() -> None:
    pool, policy = workers(0, 0), CacheAwarePolicy(CacheAwareConfig())
    first = policy.select(pool, "You are a helpful assistant. Question one?")
    # The empty-tree tie goes to the first worker; the other one has less text now.
    assert first is pool[0]
    assert policy.select(pool, "Something unrelated entirely") is pool[1]
    for question in ("two", "three", "four"):
        assert policy.select(pool, f"You are a helpful assistant. Question {question}?") is pool[0]
    assert policy.select(pool, "Something unrelated, again") is pool[1]


def test_cache_aware_match_below_threshold_goes_to_the_emptier_worker() -> None:
    pool, policy = workers(0, 0), CacheAwarePolicy(CacheAwareConfig(cache_threshold=0.5))
    policy.select(pool, "abcdefghij" * 3)  # w0 remembers 30 characters
    # Shares 10 of 40 characters with w0 (25 % < 50 %): the worker with the smaller tree wins.
    assert policy.select(pool, "abcdefghij" + "z" * 30) is pool[1]


def test_cache_aware_escapes_to_the_least_loaded_when_imbalanced() -> None:
    config = CacheAwareConfig(balance_abs_threshold=4, balance_rel_threshold=1.5)
    pool, policy = workers(0, 0), CacheAwarePolicy(config)
    assert policy.select(pool, "alpha prefix") is pool[0]
    assert policy.select(pool, "omega prefix") is pool[1]
    pool[0].in_flight, pool[1].in_flight = 10, 5  # 10 - 5 > 4 and 10 > 7.5: imbalanced
    assert policy.select(pool, "alpha prefix") is pool[1]  # the match on w0 is ignored
    # Balanced, so affinity wins even on the busier worker:
    pool[0].in_flight, pool[1].in_flight = 7, 10  # 10 < 7 * 1.5
    assert policy.select(pool, "omega prefix, more") is pool[1]
    pool[0].in_flight, pool[1].in_flight = 1, 5  # 5 > 1.5 but 5 - 1 <= 4
    assert policy.select(pool, "omega prefix, again") is pool[1]


def test_cache_aware_forgets_a_removed_worker() -> None:
    pool, policy = workers(0, 0), CacheAwarePolicy(CacheAwareConfig())
    policy.select(pool, "hello world")
    policy.forget(pool[0].url)
    assert policy.tree.size(pool[0].url) == 0
    assert policy.tree.longest_match("hello world", {pool[0].url}) == (0, None)


def test_prefix_tree_splits_matches_and_counts() -> None:
    tree = PrefixTree(max_size=1000)
    tree.insert("hello world", "a")
    tree.insert("hello there", "b")
    assert tree.longest_match("hello world!", {"a", "b"}) == (11, "a")
    assert tree.longest_match("hello wor", {"a", "b"}) == (9, "a")
    assert tree.longest_match("hello t", {"a"}) == (6, "a")  # "hello " is a's too
    assert tree.longest_match("hello t", {"b"}) == (7, "b")
    assert tree.longest_match("bye", {"a", "b"}) == (0, None)
    assert tree.size("a") == 11 and tree.size("b") == 11
    tree.insert("hello", "a")  # already there: no growth
    assert tree.size("a") == 11
    # Both have "hello ": the most recent one wins the tie.
    tree.insert("hello there", "b")
    assert tree.longest_match("hello ", {"a", "b"}) == (6, "b")


def test_prefix_tree_evicts_least_recently_used_leaves() -> None:
    tree = PrefixTree(max_size=25)
    tree.insert("aaaaaaaaaa", "t")  # 10
    tree.insert("bbbbbbbbbb", "t")  # 20
    tree.insert("aaaaaaaaaa", "t")  # touch a: b is now the oldest
    tree.insert("cccccccccc", "t")  # 30 > 25: down to 22 (0.9 x 25); b goes, and that is enough
    assert tree.size("t") == 20
    assert tree.longest_match("bbbbbbbbbb", {"t"}) == (0, None)
    assert tree.longest_match("aaaaaaaaaa", {"t"}) == (10, "t")
    assert tree.longest_match("cccccccccc", {"t"}) == (10, "t")


def test_routing_text_of_each_request_kind() -> None:
    chat = {"messages": [{"role": "system", "content": "Be brief. "},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "image_url"}]}]}
    assert routing_text(chat) == "Be brief. Hi"
    assert routing_text({"prompt": "Once"}) == "Once" and routing_text({"text": "Hello"}) == "Hello"
    assert routing_text({"input_ids": [1, 2, 3]}) == "[1, 2, 3]"
    assert routing_text({"prompt": ["a", "b"]}) == "['a', 'b']"
    assert routing_text(None) == routing_text({"model": "m"}) == ""


def test_prefix_tree_evicts_inner_nodes_once_their_leaves_are_gone() -> None:
    tree = PrefixTree(max_size=10)
    tree.insert("abcdef", "t")
    tree.insert("abcxyz", "t")  # "abc" + "def" + "xyz": 9
    tree.insert("abcdef", "u")  # another tenant keeps the shared nodes alive
    tree.insert("q" * 8, "t")  # 17 > 10: down to 9 -- "def", "xyz", then "abc" itself go
    assert tree.size("t") == 8
    assert tree.longest_match("abcdef", {"t"}) == (0, None)
    assert tree.longest_match("abcdef", {"u"}) == (6, "u")
    assert tree.longest_match("q" * 8, {"t"}) == (8, "t")
