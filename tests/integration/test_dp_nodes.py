"""Data parallelism across two launch_server "nodes" on loopback: the DP group leaders on node 1
reach node 0's main process through the cluster's authenticated scheduler link (P+2), take the
requests the DP controller deals them and send their outputs back.

* the seed's DeepSeek-V3 shape --tp 4 --ep 4 --dp-size 4 --enable-dp-attention (two DP groups
  per node; every MoE layer spans both nodes) with concurrent requests of uneven lengths, so
  groups idle in turn while the others compute: greedy outputs equal transformers';
* plain --dp-size 2 (one replica per node): outputs equal transformers', aborts reach the
  group running the request and a flush reaches both, and node 1 dying stops node 0 naming
  it, the requests in flight answered with an error.
"""

from __future__ import annotations

import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from meshserve.scheduler.process import STATS_INTERVAL_S
from tests.cluster_nodes import generate, start_nodes
from tests.hf_reference import hf_greedy

NEW_TOKENS = 4
LONG = 1500  # a request that would run for a long time (prompt + LONG < the 2048-token context)


def _prompts(seed: int, count: int) -> list[list[int]]:
    """Uneven lengths: with prefill chunks of 8 tokens the long prompts take several steps
    while the groups with short ones have finished and only join the MoE collectives."""
    rng = random.Random(seed)
    return [[rng.randrange(3, 1000) for _ in range(rng.choice((2, 3, 11, 23)))] for _ in range(count)]


def _generated_per_group(node0) -> list[int]:
    return [g["generation_tokens"] for g in httpx.get(f"{node0.base_url}/get_load").json()["dp_groups"]]


def _idle_groups(node0) -> int:
    groups = httpx.get(f"{node0.base_url}/get_load").json()["dp_groups"]
    return sum(g["idle_forwards"] > 0 for g in groups)


def test_deepseek_v3_dp_attention_over_two_nodes_matches_transformers(tmp_path, tiny_deepseek_v3_dir):
    prompts = _prompts(5, 8)
    reference = hf_greedy(tiny_deepseek_v3_dir, prompts, NEW_TOKENS)
    node0, node1 = start_nodes(tmp_path, tiny_deepseek_v3_dir, "--ep", "4", "--dp-size", "4",
                               "--enable-dp-attention", "--enable-dp-lm-head", "--moe-a2a-backend", "deepep",
                               "--chunked-prefill-size", "8", tp=4)
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(lambda p: generate(node0, p, NEW_TOKENS), prompts)) == reference
        # Groups idled in turn: several ran forwards only to join the others' MoE layers
        # (each group reports its count once a second).
        deadline = time.monotonic() + 10
        while (idled := _idle_groups(node0)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert idled >= 2, httpx.get(f"{node0.base_url}/get_load").text
        # Node 1 runs global ranks 2 and 3, the leaders of DP groups 2 and 3.
        assert "scheduler link: DP group(s) 2, 3 reach node 0" in node1.log()
        assert len(node1.scheduler_pids()) == 2
    finally:
        node0.stop()
        node1.stop()


def test_plain_dp_over_two_nodes_matches_transformers_and_node_1_dying_is_reported(tmp_path, tiny_qwen3_dir):
    prompts = _prompts(9, 6)
    reference = hf_greedy(tiny_qwen3_dir, prompts, NEW_TOKENS)
    node0, node1 = start_nodes(tmp_path, tiny_qwen3_dir, "--dp-size", "2", tp=1)
    try:
        with ThreadPoolExecutor(len(prompts)) as pool:
            assert list(pool.map(lambda p: generate(node0, p, NEW_TOKENS), prompts)) == reference

        # Aborts reach the group that runs the request, on either node: round robin puts one
        # stream on each group, each closed after its first tokens; a lost abort would leave its
        # group generating all LONG tokens.
        before = _generated_per_group(node0)
        assert len(before) == 2, before  # both groups have reported (once a second since start-up)
        body = {"input_ids": [5, 6, 7], "stream": True,
                "sampling_params": {"max_new_tokens": LONG, "temperature": 0, "ignore_eos": True}}
        for _ in range(2):
            with node0.client() as client, client.stream("POST", "/generate", json=body) as response:
                assert response.status_code == 200
                assert next(line for line in response.iter_lines() if line.startswith("data:"))
        deadline = time.monotonic() + 30
        while not (0 < min(generated := [a - b for a, b in zip(_generated_per_group(node0), before)])
                   and httpx.get(f"{node0.base_url}/get_load").json()["num_running"] == 0):
            assert time.monotonic() < deadline, generated
            time.sleep(0.5)
        time.sleep(STATS_INTERVAL_S + 0.5)  # the groups' final counts
        generated = [a - b for a, b in zip(_generated_per_group(node0), before)]
        assert all(0 < n < LONG for n in generated), generated
        # A flush goes to both groups and succeeds only when both answered.
        assert node0.client().post("/flush_cache").status_code == 200

        # Two long requests: round robin deals one to each DP group, one on the node that dies.
        results: list[httpx.Response | httpx.HTTPError] = []

        def long_request() -> None:
            try:
                with node0.client(timeout=60) as client:
                    results.append(client.post("/generate", json={"input_ids": prompts[0], "sampling_params": {
                        "max_new_tokens": LONG, "temperature": 0, "ignore_eos": True}}))
            except httpx.HTTPError as err:
                results.append(err)

        threads = [threading.Thread(target=long_request) for _ in range(2)]
        for t in threads:
            t.start()
        time.sleep(1.5)
        node1.process.send_signal(signal.SIGKILL)
        assert node0.wait_exit(timeout=15) != 0
        for t in threads:
            t.join(20)
        assert "node 1" in node0.log()
        # Neither request was left hanging: each got an error.
        assert len(results) == 2 and all(isinstance(r, httpx.HTTPError) or r.status_code >= 500 for r in results), results
    finally:
        node0.stop()
        node1.stop()
