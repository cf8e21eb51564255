"""Plain data parallelism (--dp-size 2): two independent scheduler groups behind one HTTP API.
Concurrent greedy requests equal transformers' output; both groups get work; an abort (a client
that disconnects) reaches the group running the request; a flush reaches both."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from meshserve.scheduler.process import STATS_INTERVAL_S
from tests.cluster_nodes import generate
from tests.hf_reference import hf_greedy
from tests.server_process import start_server

NEW_TOKENS = 10
LONG = 1900  # a stream whose abort went astray would run this long (prompt + LONG < 2048)


@pytest.fixture(scope="module")
def dp_server(tmp_path_factory, tiny_llama_dir):
    server = start_server(tmp_path_factory.mktemp("dp"), "--model-path", str(tiny_llama_dir), "--dp-size", "2",
                          "--max-total-tokens", "4096", "--context-length", "2048")
    yield server
    server.stop()


def _load(server) -> list[dict]:
    return server.client().get("/get_load").json()["dp_groups"]


def _wait_for(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_concurrent_greedy_requests_match_transformers_on_both_groups(dp_server, tiny_llama_dir):
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 49152) for _ in range(n)] for n in (3, 17, 8, 29, 5, 12)]
    reference = hf_greedy(tiny_llama_dir, prompts, NEW_TOKENS)
    with ThreadPoolExecutor(len(prompts)) as pool:
        outputs = list(pool.map(lambda p: generate(dp_server, p, NEW_TOKENS), prompts))
    assert outputs == reference
    assert len(dp_server.scheduler_pids()) == 2
    # Every group's own report shows tokens it generated (reports come about once a second).
    groups = _wait_for(lambda: (g := _load(dp_server)) and all(x["generation_tokens"] > 0 for x in g) and g,
                       "both DP groups to report generated tokens")
    assert [g["dp_rank"] for g in groups] == [0, 1]


def test_disconnects_abort_in_the_group_that_runs_the_request(dp_server):
    before = [g["generation_tokens"] for g in _wait_for(lambda: _load(dp_server), "load reports")]
    body = {"input_ids": [5, 6, 7], "stream": True,
            "sampling_params": {"max_new_tokens": LONG, "temperature": 0, "ignore_eos": True}}
    # Round robin puts one stream on each group; each is closed after its first tokens.
    for _ in range(2):
        with dp_server.client() as client, client.stream("POST", "/generate", json=body) as response:
            assert response.status_code == 200
            assert next(line for line in response.iter_lines() if line.startswith("data:"))
    _wait_for(lambda: [g["num_running"] for g in _load(dp_server)] == [0, 0], "both groups idle after the aborts")
    time.sleep(STATS_INTERVAL_S + 0.5)  # the groups' final counts
    generated = [g["generation_tokens"] - b for g, b in zip(_load(dp_server), before)]
    # Each group ran one of the streams and stopped it early: its abort reached it. (A lost abort
    # would leave that group generating all LONG tokens.)
    assert all(0 < n < LONG for n in generated), generated


def test_flush_cache_reaches_every_group(dp_server):
    r = dp_server.client().post("/flush_cache")
    assert r.status_code == 200, r.text

