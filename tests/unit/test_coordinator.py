"""Tests for the cluster coordinator, the fingerprint and the doctor.

Real TCP on 127.0.0.1. Nodes run in threads of this process where only the protocol matters,
and as separate processes (this file run as a script: `python test_coordinator.py node ...`)
where a node must die for real (SIGKILL, SIGSTOP).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from meshserve.cluster.auth import ClusterSecret
from meshserve.cluster.coordinator import ClusterCoordinator, ClusterError
from meshserve.cluster.fingerprint import Fingerprint, GraphValue, ModelFiles
from meshserve.cluster.port_plan import pick_free_base_port

HOST = "127.0.0.1"
GRAPH: dict[str, GraphValue] = {"tp_size": 4, "nnodes": 2, "context_length": 2048,
                                 "dtype": "bfloat16"}


SECRET = ClusterSecret(b"unit-test-cluster-secret", "test")


def make_fingerprint(**graph: GraphValue) -> Fingerprint:
    return Fingerprint(meshserve_version="0.1.0", torch_version="2.13.0", nccl_version=None,
                       graph={**GRAPH, **graph}, model=None, device_count=0)


# ---- in-process nodes ---------------------------------------------------------------------------


@dataclass
class Node:
    """A coordinator whose start() runs in a thread, recording what happens to it."""

    coordinator: ClusterCoordinator
    failures: list[tuple[str, bool, float]]  # (reason, clean, monotonic time) per callback
    error: ClusterError | None = None
    thread: threading.Thread | None = None

    def start(self) -> Node:
        def run() -> None:
            try:
                self.coordinator.start()
            except ClusterError as err:
                self.error = err

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def join(self, timeout: float = 60.0) -> Node:  # bounds of waits on conditions: generous for loaded CI
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "start() did not return"
        return self

    def wait_failure(self, timeout: float = 60.0) -> tuple[str, bool, float]:
        deadline = time.monotonic() + timeout
        while not self.failures and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.failures, "on_failure was not called"
        return self.failures[0]


def node(rank: int, nnodes: int, port: int, *, timeout: float = 30.0,
         fingerprint: Fingerprint | None = None, secret: ClusterSecret = SECRET,
         silence_timeout: float = 15.0) -> Node:
    failures: list[tuple[str, bool, float]] = []
    coordinator = ClusterCoordinator(
        node_rank=rank, nnodes=nnodes, address=(HOST, port), secret=secret,
        silence_timeout=silence_timeout,
        fingerprint=fingerprint or make_fingerprint(nnodes=nnodes), startup_timeout=timeout,
        on_failure=lambda reason, clean: failures.append((reason, clean, time.monotonic())))
    return Node(coordinator, failures)


def cluster(nnodes: int, port: int) -> list[Node]:
    nodes = [node(r, nnodes, port).start() for r in range(nnodes)]
    for n in nodes:
        n.join()
        assert n.error is None, n.error
        assert n.coordinator.is_whole
    return nodes


@pytest.fixture
def port() -> int:
    """A coordinator port (P+1 of a free base port P)."""
    return pick_free_base_port(HOST) + 1


# ---- process nodes ------------------------------------------------------------------------------


class NodeProcess:
    """A coordinator in its own process; its events arrive as JSON lines on stdout."""

    def __init__(self, rank: int, nnodes: int, port: int, *, action: str = "wait") -> None:
        config = {"rank": rank, "nnodes": nnodes, "port": port, "action": action}
        self.proc = subprocess.Popen([sys.executable, __file__, "node", json.dumps(config)],
                                     stdout=subprocess.PIPE, text=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.put(json.loads(line))

    def expect(self, event: str, timeout: float = 60.0) -> dict[str, Any]:
        got = self.events.get(timeout=timeout)
        assert got["event"] == event, got
        return got

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> float:
        self.proc.send_signal(sig)
        return time.monotonic()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _node_main(config: dict[str, Any]) -> int:
    """Entry point of a NodeProcess. Exits like the launcher will: 3 on a failure, 0 on a
    clean stop, 2 when start() fails."""

    def emit(event: str, **data: Any) -> None:
        print(json.dumps({"event": event, **data}), flush=True)

    def on_failure(reason: str, clean: bool) -> None:
        emit("failure", reason=reason, clean=clean)
        os._exit(0 if clean else 3)

    coordinator = ClusterCoordinator(
        node_rank=config["rank"], nnodes=config["nnodes"], address=(HOST, config["port"]),
        fingerprint=make_fingerprint(nnodes=config["nnodes"]), secret=SECRET, startup_timeout=10,
        on_failure=on_failure)
    try:
        coordinator.start()
    except ClusterError as err:
        emit("start_error", message=str(err))
        return 2
    emit("whole")
    if config["action"] == "report_failure":
        coordinator.report_failure("scheduler rank 5 exited with code -9")
    time.sleep(60)
    return 1


@pytest.fixture
def processes() -> Any:
    started: list[NodeProcess] = []

    def spawn(*args: Any, **kwargs: Any) -> NodeProcess:
        started.append(NodeProcess(*args, **kwargs))
        return started[-1]

    yield spawn
    for p in started:
        p.close()


# ---- fingerprint --------------------------------------------------------------------------------


def test_diff_names_user_facing_flags() -> None:
    mine = make_fingerprint()
    theirs = make_fingerprint(context_length=1024, tp_size=8)
    assert mine.diff(theirs, self_name="node 0", other_name="node 1") == [
        "--context-length: node 0 has 2048, node 1 has 1024",
        "--tp-size: node 0 has 4, node 1 has 8",
    ]
    assert mine.diff(make_fingerprint()) == []


def test_diff_versions_and_device_count() -> None:
    mine = make_fingerprint()
    other = Fingerprint(meshserve_version="0.2.0", torch_version="2.11.0", nccl_version="2.21.5",
                        graph={**GRAPH, "max_total_tokens": 4096}, model=None, device_count=8)
    lines = mine.diff(other, self_name="node 0", other_name="node 1")
    assert lines == [
        "meshserve version: node 0 has 0.1.0, node 1 has 0.2.0",
        "torch version: node 0 has 2.13.0, node 1 has 2.11.0",
        "NCCL version: node 0 has (not set), node 1 has 2.21.5",
        "--max-total-tokens: node 0 has (absent), node 1 has 4096",
    ]  # device_count is informational: nodes may differ


def _model_dir(root: Path, *, weight_bytes: int = 64, eos: int = 2) -> Path:
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"hidden_size": 64, "vocab_size": 128}))
    (root / "model-00001-of-00002.safetensors").write_bytes(b"\0" * weight_bytes)
    (root / "model-00002-of-00002.safetensors").write_bytes(b"\0" * 32)
    (root / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (root / "tokenizer.json").write_text('{"model": {}}')
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return root


def test_model_files_hashes(tmp_path: Path) -> None:
    base = ModelFiles.of(_model_dir(tmp_path / "a"))
    assert base.weights_files == 2 and base.weights_bytes == 96
    # Paths may differ and config.json formatting does not matter.
    same = _model_dir(tmp_path / "b")
    (same / "config.json").write_text('{\n  "vocab_size": 128,\n  "hidden_size": 64\n}\n')
    other = ModelFiles.of(same)
    assert (other.config_hash, other.weights_hash, other.tokenizer_hash) == (
        base.config_hash, base.weights_hash, base.tokenizer_hash)
    # A different weight size (a truncated download) and a different EOS id are differences.
    changed = ModelFiles.of(_model_dir(tmp_path / "c", weight_bytes=65, eos=7))
    fa = make_fingerprint()
    fa = Fingerprint(**{**{f: getattr(fa, f) for f in fa.__struct_fields__}, "model": base})
    fc = Fingerprint(**{**{f: getattr(fa, f) for f in fa.__struct_fields__}, "model": changed})
    lines = fa.diff(fc, self_name="node 0", other_name="node 1")
    assert [line.split(":")[0] for line in lines] == [
        "--model-path weight files (names and sizes)", "--model-path tokenizer files"]
    assert f"node 0 has {tmp_path / 'a'} ({base.weights_hash[:12]})" in lines[0]


def test_fingerprint_from_server_args_resolves_dtype_and_context(tmp_path: Path) -> None:
    from meshserve.config.model_config import ModelConfig
    from meshserve.config.server_args import ServerArgs

    model_dir = _model_dir(tmp_path / "m")
    args = ServerArgs().replace(model_path=str(model_dir), device="cpu", tp_size=2, port=8000,
                                node_rank=1, dist_init_addr="10.0.0.1:20000")
    config = ModelConfig(model_path=str(model_dir), tokenizer_path=str(model_dir),
                         served_model_name="m", architecture="LlamaForCausalLM",
                         dtype="bfloat16", context_length=4096, vocab_size=128,
                         eos_token_ids=(2,), hf_config=None)  # type: ignore[arg-type]
    fp = Fingerprint.from_server_args(args, config)
    assert fp.graph["dtype"] == "bfloat16" and fp.graph["context_length"] == 4096
    assert fp.graph["tp_size"] == 2 and fp.graph["device"] == "cpu"
    assert not {"node_rank", "port", "host", "dist_init_addr"} & fp.graph.keys()
    assert fp.model is not None and fp.model.weights_files == 2
    # Per-node values do not make a difference.
    other = Fingerprint.from_server_args(args.replace(node_rank=0, port=9000), config)
    assert fp.diff(other) == []


# ---- join ---------------------------------------------------------------------------------------


def test_join_ok_then_clean_shutdown_reaches_every_node(port: int) -> None:
    nodes = cluster(3, port)
    assert [n.node_rank for n in nodes[2].coordinator.nodes] == [0, 1, 2]
    nodes[0].coordinator.shutdown(clean=True, reason="SIGTERM on node 0")
    for n in nodes[1:]:
        reason, clean, _ = n.wait_failure()
        assert (reason, clean) == ("SIGTERM on node 0", True)
        assert not n.coordinator.is_whole
    assert nodes[0].failures == []  # no callback for this node's own shutdown
    assert not nodes[0].coordinator.is_whole


def test_mismatched_fingerprint_refused_on_both_sides(port: int) -> None:
    leader = node(0, 2, port).start()
    follower = node(1, 2, port, fingerprint=make_fingerprint(context_length=1024)).start()
    leader.join(), follower.join()
    expected = "--context-length: node 0 has 2048, node 1 has 1024"
    assert leader.error is not None and follower.error is not None
    assert expected in str(leader.error) and "node 1 (127.0.0.1" in str(leader.error)
    assert expected in str(follower.error) and "refused node 1" in str(follower.error)
    assert leader.failures == [] and follower.failures == []


def test_duplicate_node_rank_refused(port: int) -> None:
    leader = node(0, 3, port).start()
    first = node(1, 3, port).start()
    time.sleep(0.8)  # the first rank-1 node is in
    second = node(1, 3, port).start()
    for n in (leader, first, second):
        n.join()
    assert "node rank 1 is already taken by 127.0.0.1" in str(second.error)
    assert "two nodes claim node rank 1" in str(leader.error)
    assert "two nodes claim node rank 1" in str(first.error)  # told by node 0, not left waiting


def test_node_that_never_joins_is_named_at_the_timeout(port: int) -> None:
    started = time.monotonic()
    leader = node(0, 3, port, timeout=2.0).start()
    follower = node(1, 3, port, timeout=10.0).start()
    leader.join(), follower.join()
    took = time.monotonic() - started
    assert 1.9 < took < 20.0  # named at the 2 s timeout, not hung (slack for a loaded machine)
    assert leader.error is not None
    message = str(leader.error)
    assert "start-up timeout: after 2 s, node 2 has not joined" in message
    assert "joined: node 1 (127.0.0.1" in message
    assert "node 2 has not joined" in str(follower.error)  # node 0 told it why


def test_follower_gives_up_when_node_0_never_listens(port: int) -> None:
    started = time.monotonic()
    follower = node(1, 2, port, timeout=1.5).start().join()
    assert time.monotonic() - started < 3.0
    assert f"could not reach node 0's coordinator at 127.0.0.1:{port} within 1.5 s" in str(
        follower.error)


def test_node_rejoining_during_start_up_is_forgiven(port: int) -> None:
    leader = node(0, 3, port).start()
    flaky = node(1, 3, port).start()
    time.sleep(0.8)
    flaky.coordinator.shutdown(clean=True, reason="restarting")  # leaves during start-up
    flaky.join()
    again, last = node(1, 3, port).start(), node(2, 3, port).start()
    for n in (leader, again, last):
        n.join()
        assert n.error is None and n.coordinator.is_whole


def test_junk_connection_does_not_disturb_start_up(port: int) -> None:
    import socket

    leader = node(0, 2, port).start()
    time.sleep(0.3)
    with socket.create_connection((HOST, port)) as junk:
        junk.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # a length of 1.2 GB: refused
        follower = node(1, 2, port).start()
        leader.join(), follower.join()
    assert leader.error is None and follower.error is None


def test_late_join_after_start_is_refused_without_harm(port: int) -> None:
    nodes = cluster(2, port)
    late = node(1, 2, port, timeout=2.0).start().join()
    assert "the cluster is already running (node rank 1 is node 1 (127.0.0.1" in str(late.error)
    time.sleep(0.2)
    assert all(n.coordinator.is_whole for n in nodes) and nodes[0].failures == []
    nodes[0].coordinator.shutdown(clean=True, reason="test over")


# ---- failures after start-up --------------------------------------------------------------------


def test_report_failure_reaches_every_node(port: int) -> None:
    nodes = cluster(3, port)
    nodes[2].coordinator.report_failure("scheduler rank 5 exited with code -9")
    for n in nodes:
        reason, clean, _ = n.wait_failure()
        assert reason == "node 2 (127.0.0.1): scheduler rank 5 exited with code -9"
        assert clean is False
        assert not n.coordinator.is_whole
        assert n.coordinator.failure_reason == reason


def test_node_leaving_fails_the_cluster(port: int) -> None:
    nodes = cluster(2, port)
    nodes[1].coordinator.shutdown(clean=True, reason="SIGTERM")
    reason, clean, _ = nodes[0].wait_failure()
    assert (reason, clean) == ("node 1 (127.0.0.1) is shutting down: SIGTERM", False)


def test_sigkill_of_a_node_reaches_every_other_node(port: int, processes: Any) -> None:
    leader = node(0, 3, port).start()
    survivor, victim = processes(1, 3, port), processes(2, 3, port)
    leader.join()
    assert leader.error is None
    survivor.expect("whole"), victim.expect("whole")
    killed_at = victim.kill(signal.SIGKILL)
    reason, clean, seen_at = leader.wait_failure()
    assert reason.startswith("node 2 (127.0.0.1") and "closed its connection" in reason
    assert not clean and seen_at - killed_at < 2.0
    event = survivor.expect("failure")
    assert event["reason"] == reason and event["clean"] is False
    assert survivor.proc.wait(60) == 3  # the launcher's way: exit non-zero
    assert time.monotonic() - killed_at < 5.0


def test_sigkill_of_node_0_reaches_the_others(port: int, processes: Any) -> None:
    leader = processes(0, 2, port)
    follower = node(1, 2, port).start().join()
    assert follower.error is None
    leader.expect("whole")
    killed_at = leader.kill(signal.SIGKILL)
    reason, clean, seen_at = follower.wait_failure()
    assert reason.startswith(f"lost node 0 (127.0.0.1:{port})") and not clean
    assert seen_at - killed_at < 2.0


def test_silent_node_is_declared_dead_after_the_window_only(port: int, processes: Any) -> None:
    """SIGSTOP keeps the socket open: only the missing heartbeats reveal the node, and only
    after the silence window (a shorter stall is survived)."""
    leader = node(0, 2, port, silence_timeout=3.0).start()
    frozen = processes(1, 2, port)
    leader.join()
    frozen.expect("whole")
    frozen.kill(signal.SIGSTOP)
    time.sleep(2.0)  # shorter than the window: survived
    frozen.kill(signal.SIGCONT)
    time.sleep(1.0)
    assert leader.failures == [] and leader.coordinator.is_whole
    stopped_at = frozen.kill(signal.SIGSTOP)
    reason, clean, seen_at = leader.wait_failure()
    assert reason.startswith("node 1 (127.0.0.1") and "stopped responding (silent for 3 s" in reason
    assert not clean
    assert 2.5 < seen_at - stopped_at < 8.0  # the window after the last heartbeat (+ CI slack)


def test_report_failure_from_a_process(port: int, processes: Any) -> None:
    leader = node(0, 2, port).start()
    failing = processes(1, 2, port, action="report_failure")
    leader.join()
    failing.expect("whole")
    reason, _, _ = leader.wait_failure()
    assert reason == "node 1 (127.0.0.1): scheduler rank 5 exited with code -9"
    assert failing.expect("failure")["reason"] == reason
    assert failing.proc.wait(60) == 3


# ---- strangers and failure naming ------------------------------------------------------------


def _stranger(port: int, data: bytes) -> bytes:
    """Connect, send ``data``, and return everything the coordinator sent until it closed."""
    import socket

    received = b""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:  # closed with our unread bytes pending: a reset
            pass
    return received


def test_strangers_are_dropped_and_learn_nothing(port: int, caplog: pytest.LogCaptureFixture) -> None:
    import msgspec

    from meshserve.cluster.coordinator import Join
    from meshserve.cluster.frames import pack_frame

    leader = node(0, 2, port).start()
    time.sleep(0.3)
    # A Join with a mismatched fingerprint, without the handshake: it used to stop node 0.
    join = Join(node_rank=1, fingerprint=make_fingerprint(context_length=1), hostname="evil", pid=1)
    answers = [_stranger(port, pack_frame(msgspec.msgpack.encode(join))),
               _stranger(port, b"\x00\x01garbage\xff" * 10),
               _stranger(port, b"\xff\xff\xff\xff")]  # a 4 GiB frame
    for answer in answers:  # a challenge and a bare denial at most: no setting, no reason
        assert b"context" not in answer and b"tp_size" not in answer and len(answer) < 100
    wrong = node(1, 2, port, secret=ClusterSecret(b"not-the-cluster-secret", "test")).start().join()
    assert "refused this node's cluster secret" in str(wrong.error)
    right = node(1, 2, port).start()
    leader.join(), right.join()
    assert leader.error is None and right.error is None and leader.coordinator.is_whole
    dropped = [r.getMessage() for r in caplog.records if "dropped a connection from 127.0.0.1" in r.getMessage()]
    assert len(dropped) == 4, dropped  # one line each: address and why
    leader.coordinator.shutdown(clean=True, reason="test over")


def test_a_decisive_report_names_the_failure_over_an_earlier_consequence(port: int) -> None:
    nodes = cluster(2, port)
    # Node 0's rank fails first with a collective error; node 1 then reports its killed rank.
    nodes[0].coordinator.report_failure("rank 0: RuntimeError: Connection closed by peer", decisive=False)
    time.sleep(0.2)
    nodes[1].coordinator.report_failure("scheduler rank 1 on node 1 (pid 7) was killed by SIGKILL")
    for n in nodes:
        reason, clean, _ = n.wait_failure()
        assert reason == "node 1 (127.0.0.1): scheduler rank 1 on node 1 (pid 7) was killed by SIGKILL"
        assert not clean


def test_a_lone_consequence_still_stops_the_cluster_after_the_grace(port: int) -> None:
    from meshserve.cluster.coordinator import CONSEQUENCE_GRACE_S

    nodes = cluster(2, port)
    reported_at = time.monotonic()
    nodes[1].coordinator.report_failure("scheduler rank 1 on node 1 (pid 7) exited with code 1", decisive=False)
    for n in nodes:
        reason, _, seen_at = n.wait_failure()
        assert reason == "node 1 (127.0.0.1): scheduler rank 1 on node 1 (pid 7) exited with code 1"
        assert seen_at - reported_at >= CONSEQUENCE_GRACE_S * 0.9


# ---- doctor -------------------------------------------------------------------------------------


def _doctor(port: int, model_dirs: list[Path]) -> list[tuple[int, str]]:
    procs = [subprocess.Popen(
        [sys.executable, "-m", "meshserve.doctor", "--dist-init-addr", f"{HOST}:{port}",
         "--nnodes", str(len(model_dirs)), "--node-rank", str(rank), "--device", "cpu",
         "--model-path", str(model_dir), "--timeout", "20"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "MESHSERVE_CLUSTER_SECRET": SECRET.value.decode()})
        for rank, model_dir in enumerate(model_dirs)]
    return [(p.wait(40), p.communicate()[0]) for p in procs]


def test_doctor_two_processes_ok(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "m")
    results = _doctor(pick_free_base_port(HOST), [model, model])
    for rc, out in results:
        assert rc == 0, out
        verdict = out.strip().splitlines()[-1]
        assert verdict.startswith("doctor: OK — 2 node(s), interface lo (127.0.0.1), all-reduce ")
        assert verdict.endswith("ms, model files match"), verdict
        assert "[ok] all-reduce" in out and "result correct" in out


def test_doctor_names_model_files_that_differ(tmp_path: Path) -> None:
    a, b = _model_dir(tmp_path / "a"), _model_dir(tmp_path / "b", weight_bytes=10)
    results = _doctor(pick_free_base_port(HOST), [a, b])
    for rc, out in results:
        assert rc == 1, out
        verdict = out.strip().splitlines()[-1]
        assert verdict.startswith("doctor: FAIL — join: "), out
        assert "--model-path weight files (names and sizes): node 0 has" in out


if __name__ == "__main__":
    assert sys.argv[1] == "node"
    sys.exit(_node_main(json.loads(sys.argv[2])))
