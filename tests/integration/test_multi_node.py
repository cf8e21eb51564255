"""Two "nodes" on localhost: two launch_server processes with --tp 2 --nnodes 2 --node-rank 0|1
--dist-init-addr 127.0.0.1:P. Greedy outputs equal tp=1 and transformers; the cluster fails
fast and says what died; mismatched nodes are refused by name; a missing node is named."""

from __future__ import annotations

import random
import signal
import time

import httpx
import pytest

from tests.cluster_nodes import SECRET, base_port, cluster_args, generate, start_nodes
from tests.hf_reference import hf_greedy
from tests.server_process import start_server

NEW_TOKENS = 12


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (6, 21)]


def test_two_nodes_match_transformers_and_fail_fast(tmp_path, tiny_qwen3_dir, prompts):
    reference = hf_greedy(tiny_qwen3_dir, prompts, NEW_TOKENS)
    node0, node1 = start_nodes(tmp_path, tiny_qwen3_dir)
    try:
        assert "port plan" in node0.log() and "cluster network" in node1.log()
        assert [generate(node0, p, NEW_TOKENS) for p in prompts] == reference
        assert httpx.get(f"{node1.base_url}/health").status_code == 200
        assert "meshserve:cluster_whole 1.0" in httpx.get(f"{node1.base_url}/metrics").text
        assert node1.client().post("/generate", json={"text": "hi"}).status_code == 404  # API only on node 0

        # Kill node 1 while a long generation runs on node 0.
        with httpx.Client(base_url=node0.base_url, timeout=60) as client:
            import threading

            result: dict = {}

            def long_request() -> None:
                try:
                    result["response"] = client.post("/generate", json={"input_ids": prompts[0], "sampling_params": {
                        "max_new_tokens": 1500, "temperature": 0, "ignore_eos": True}})
                except httpx.HTTPError as err:
                    result["error"] = err

            t = threading.Thread(target=long_request)
            t.start()
            time.sleep(1.5)
            killed_at = time.monotonic()
            node1.process.send_signal(signal.SIGKILL)
            code = node0.wait_exit(timeout=10)
            assert time.monotonic() - killed_at < 10
            t.join(20)
        assert code != 0
        assert "node 1" in node0.log()
        # The in-flight request was answered with an error, not left hanging.
        assert "error" in result or result["response"].status_code >= 500, result
    finally:
        node0.stop()
        node1.stop()


def test_mismatched_flag_is_refused_by_name(tmp_path, tiny_qwen3_dir):
    base_extra = ("--context-length", "1024")
    node0, node1 = start_nodes(tmp_path, tiny_qwen3_dir, node1_extra=base_extra, wait=False)
    try:
        assert node0.wait_exit(timeout=60) != 0
        assert node1.wait_exit(timeout=60) != 0
        for node in (node0, node1):
            assert "--context-length" in node.log(), node.log()[-2000:]
    finally:
        node0.stop()
        node1.stop()


def test_missing_node_is_named_after_the_startup_timeout(tmp_path, tiny_qwen3_dir):
    base = base_port()
    node0 = start_server(tmp_path, *cluster_args(tiny_qwen3_dir, base), "--node-rank", "0",
                         "--startup-timeout", "3", wait=False)
    try:
        assert node0.wait_exit(timeout=60) != 0
        assert "node 1" in node0.log(), node0.log()[-2000:]
    finally:
        node0.stop()


def test_duplicate_node_rank_is_refused(tmp_path, tiny_qwen3_dir):
    # Four nodes (tp 4 fits the 4-head model, checked before the join), so that node 0 is still
    # waiting when the second "node 1" arrives. The refusal happens at the join.
    base = base_port()
    common = [*cluster_args(tiny_qwen3_dir, base, nnodes=4, tp=4), "--startup-timeout", "30"]
    node0 = start_server(tmp_path, *common, "--node-rank", "0", wait=False)
    a = start_server(tmp_path, *common, "--node-rank", "1", wait=False)
    b = start_server(tmp_path, *common, "--node-rank", "1", wait=False)
    try:
        assert node0.wait_exit(timeout=60) != 0
        assert "already taken" in node0.log() or "already taken" in a.log() + b.log(), node0.log()[-2000:]
    finally:
        for s in (node0, a, b):
            s.stop()


def test_two_nodes_in_network_namespaces_match_transformers(tmp_path, tiny_qwen3_dir, prompts):
    """The same two-node cluster, each node in its own network namespace with its own address:
    the cluster interface is the veth, not loopback, and the output is still exact."""
    import json
    import os
    import subprocess
    import sys

    from tests import netns

    reference = hf_greedy(tiny_qwen3_dir, prompts, NEW_TOKENS)
    with netns.two_namespaces() as (ns_a, ns_b):
        addr0 = f"{netns.SUBNET}.1"
        common = ["--model-path", str(tiny_qwen3_dir), "--device", "cpu", "--tp", "2", "--nnodes", "2",
                  "--dist-init-addr", f"{addr0}:29500", "--max-total-tokens", "2048", "--port", "30000",
                  "--cluster-secret", SECRET]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        procs, logs = [], []
        for ns, rank, host in ((ns_a, 0, addr0), (ns_b, 1, f"{netns.SUBNET}.2")):
            log = tmp_path / f"ns-node{rank}.log"
            logs.append(log)
            with log.open("wb") as out:
                procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", ns, sys.executable, "-m", "meshserve.launch_server", *common,
                     "--node-rank", str(rank), "--host", host], stdout=out, stderr=subprocess.STDOUT, env=env))
        client = f"""
import json, time, urllib.request
url = "http://{addr0}:30000"
for _ in range(600):
    try:
        if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
            break
    except Exception:
        time.sleep(0.3)
outs = []
for ids in {json.dumps(prompts)}:
    body = json.dumps({{"input_ids": ids, "sampling_params": {{"max_new_tokens": {NEW_TOKENS},
                      "temperature": 0, "ignore_eos": True}}}}).encode()
    req = urllib.request.Request(url + "/generate", body, {{"Content-Type": "application/json"}})
    outs.append(json.loads(urllib.request.urlopen(req, timeout=120).read())["output_ids"])
print(json.dumps(outs))
"""
        try:
            result = subprocess.run(["ip", "netns", "exec", ns_a, sys.executable, "-c", client],
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr + logs[0].read_text()[-3000:]
            assert json.loads(result.stdout) == reference
            assert f"address {addr0}" in logs[0].read_text()  # the veth, not loopback
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(30)


def test_sigterm_on_node_0_stops_every_node_cleanly(tmp_path, tiny_qwen3_dir):
    node0, node1 = start_nodes(tmp_path, tiny_qwen3_dir)
    try:
        node0.process.send_signal(signal.SIGTERM)
        assert node0.wait_exit(timeout=30) == 0
        assert node1.wait_exit(timeout=15) == 0
    finally:
        node0.stop()
        node1.stop()


def test_tp2_in_one_launch_server_matches_transformers(tmp_path, tiny_llama_dir, prompts):
    reference = hf_greedy(tiny_llama_dir, prompts, NEW_TOKENS)
    server = start_server(tmp_path, "--model-path", str(tiny_llama_dir), "--tp", "2", "--max-total-tokens", "2048")
    try:
        assert [generate(server, p, NEW_TOKENS) for p in prompts] == reference
        assert len(server.scheduler_pids()) == 2
    finally:
        server.stop()


def test_different_model_is_refused(tmp_path, tiny_qwen3_dir, tiny_llama_dir):
    base = base_port()

    def node(rank: int, model_dir) -> object:
        return start_server(tmp_path, *cluster_args(model_dir, base), "--node-rank", str(rank), wait=False)

    node0, node1 = node(0, tiny_qwen3_dir), node(1, tiny_llama_dir)
    try:
        assert node0.wait_exit(timeout=60) != 0 and node1.wait_exit(timeout=60) != 0
        assert "model" in node0.log().split("refus", 1)[-1].lower(), node0.log()[-2000:]
    finally:
        node0.stop()
        node1.stop()
