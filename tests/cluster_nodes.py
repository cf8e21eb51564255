"""Two (or three) launch_server "nodes" on localhost, for the multi-node integration tests."""

from __future__ import annotations

import datetime
import re
import signal
from pathlib import Path

import psutil

from tests.server_process import ServerProcess, free_port, is_free, reserve, start_server

#: Every test cluster shares this secret (the nodes must prove they hold it).
SECRET = "integration-test-cluster-secret"


def base_port() -> int:
    """A base port P such that P, P+1, P+2 are free, all three reserved for the caller."""
    for _ in range(50):
        p = free_port()
        if p + 2 < 65536 and all(is_free(p + i) for i in (1, 2)):
            reserve(p + 1)
            reserve(p + 2)
            return p
    raise RuntimeError("no free port triple")


def cluster_args(model_dir: Path, base: int, *, nnodes: int = 2, tp: int = 2) -> list[str]:
    return ["--model-path", str(model_dir), "--tp", str(tp), "--nnodes", str(nnodes),
            "--dist-init-addr", f"127.0.0.1:{base}", "--cluster-secret", SECRET,
            "--max-total-tokens", "2048"]


def start_nodes(log_dir: Path, model_dir: Path, *extra: str, node1_extra: tuple[str, ...] = (),
                wait: bool = True, tp: int = 2) -> tuple[ServerProcess, ServerProcess]:
    common = [*cluster_args(model_dir, base_port(), tp=tp), *extra]
    node0 = start_server(log_dir, *common, "--node-rank", "0", wait=False)
    node1 = start_server(log_dir, *common, "--node-rank", "1", *node1_extra, wait=False)
    if wait:
        node0.wait_ready()
        node1.wait_ready()
    return node0, node1


def generate(server: ServerProcess, ids: list[int], n: int) -> list[int]:
    r = server.client().post("/generate", json={"input_ids": ids, "sampling_params": {
        "max_new_tokens": n, "temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def signal_node(server: ServerProcess, sig: signal.Signals) -> None:
    """``sig`` to a whole node: its launcher and every process under it (a stalled machine)."""
    for proc in [psutil.Process(server.process.pid), *psutil.Process(server.process.pid).children(recursive=True)]:
        proc.send_signal(sig)


def log_time(log: str, pattern: str) -> float:
    """The time.time() of the first log line matching ``pattern`` (launch_server's asctime)."""
    match = re.search(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*" + pattern, log, re.MULTILINE)
    assert match, f"no log line matches {pattern!r}:\n{log[-3000:]}"
    return datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
