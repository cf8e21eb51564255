"""Prefill-decode disaggregation with tensor parallelism (NIXL, tiny random Llama with 2 KV heads):
prefill --tp 2 with decode --tp 2, each on two nodes (--nnodes 2; rank i writes into rank i),
and a prefill --tp 1 with that decode (the prefill's two KV heads split over the decode's
ranks), answer concurrent greedy requests exactly as a plain --tp 1 server, with the servers
idle afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import SERVER_TEST_ARGS
from tests.pd_cluster import Prefill, send_pd, start_decode, start_prefill, wait_idle
from tests.cluster_nodes import base_port, cluster_args
from tests.server_process import ServerProcess, start_server


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory,
            tiny_llama_dir) -> Iterator[tuple[ServerProcess, Prefill, Prefill, ServerProcess]]:
    log_dir = tmp_path_factory.mktemp("pd_tp")
    model = ("--model-path", str(tiny_llama_dir))
    plain = start_server(log_dir, *SERVER_TEST_ARGS, *model)
    first = base_port()
    second = next(p for p in iter(base_port, None) if abs(p - first) > 2)  # two clusters, disjoint port plans
    prefill_cluster, decode_cluster = cluster_args(tiny_llama_dir, first), cluster_args(tiny_llama_dir, second)
    prefill_tp2 = start_prefill(log_dir, *prefill_cluster, "--node-rank", "0")
    prefill_node1 = start_prefill(log_dir, *prefill_cluster, "--node-rank", "1", bootstrap_port=prefill_tp2.bootstrap_port)
    decode_tp2 = start_decode(log_dir, *decode_cluster, "--node-rank", "0")
    decode_node1 = start_decode(log_dir, *decode_cluster, "--node-rank", "1")
    prefill_tp1 = start_prefill(log_dir, *model)
    started = [plain, prefill_tp2.server, prefill_node1.server, decode_tp2, decode_node1, prefill_tp1.server]
    try:
        for server in started:
            server.wait_ready()
        yield plain, prefill_tp2, prefill_tp1, decode_tp2
    finally:
        for server in started:
            server.stop()


def _bodies(n: int) -> list[dict]:
    return [{"input_ids": [(11 * i + j * 17) % 49000 + 1 for j in range(4 + 7 * i)],
             "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}} for i in range(n)]


def _check_against_plain(plain: ServerProcess, prefill: Prefill, decode: ServerProcess) -> None:
    bodies = _bodies(12)
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: send_pd(prefill, decode, "/generate", b), bodies))
    want = [httpx.post(f"{plain.base_url}/generate", json=b, timeout=120).json()["output_ids"] for b in bodies]
    assert [(p.status, d.status) for p, d in answers] == [(200, 200)] * len(bodies), answers
    assert [d.body["output_ids"] for _, d in answers] == want
    wait_idle(prefill.server, decode)


def test_two_node_prefill_tp2_with_two_node_decode_tp2_equals_a_plain_server(servers) -> None:
    plain, prefill, _, decode = servers
    _check_against_plain(plain, prefill, decode)


def test_prefill_tp1_with_decode_tp2_equals_a_plain_server(servers) -> None:
    plain, _, prefill, decode = servers
    _check_against_plain(plain, prefill, decode)
