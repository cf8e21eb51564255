"""The KV-transfer backends between two real processes on 127.0.0.1, over TCP (UCX_TLS=tcp).

Each peer is this file run as a script: it holds a bf16 KV pool (K and V per layer, torch CPU
tensors) and obeys JSON commands, one per line on stdin, answering one JSON line on stdout.
The parent compares the pools' raw bytes."""

from __future__ import annotations

import base64
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import pytest

LAYERS, SLOTS, HEADS, DIM = 3, 96, 2, 32
ITEM_BYTES = HEADS * DIM * 2  # one slot of one buffer, bf16
DEAD_PEER_BOUND_S = 15.0

# src slot i goes to dst slot i: two runs that merge, holes, singletons, and a run that is
# consecutive at the source but not at the destination
SRC_SLOTS = [5, 6, 7, 8, 20, 33, 34, 35, 60, 61, 62, 63, 64, 90]
DST_SLOTS = [10, 11, 12, 13, 3, 40, 41, 70, 71, 72, 50, 51, 52, 95]

BACKENDS = ["nixl", "mooncake"]


# ---------------------------------------------------------------- the peer process (child side)

def serve() -> None:
    import torch

    from meshserve.disagg.kv_ranges import paired_kv_ranges
    from meshserve.disagg.transfer import MemoryRegion, TransferError, TransferStatus, create_backend

    out = os.fdopen(os.dup(1), "wb")  # the protocol's own stdout; library chatter goes to stderr
    os.dup2(2, 1)
    pool: list[torch.Tensor] = []
    backends = {}

    def reply(**fields: object) -> None:
        out.write(msgspec.json.encode(fields) + b"\n")
        out.flush()

    for line in sys.stdin.buffer:
        cmd = msgspec.json.decode(line)
        op = cmd["op"]
        if op == "pool":
            gen = torch.Generator().manual_seed(cmd["seed"]) if cmd["seed"] is not None else None
            for _ in range(2 * LAYERS):
                t = torch.zeros(SLOTS, HEADS, DIM, dtype=torch.bfloat16)
                if gen is not None:
                    t.copy_(torch.randn(SLOTS, HEADS, DIM, generator=gen))
                pool.append(t)
            reply(bases=[t.data_ptr() for t in pool])
        elif op == "backend":
            os.environ.update(cmd["env"])  # read by create_backend: the failure-injection settings
            backend = create_backend(cmd["backend"], agent_name=cmd["agent"], host="127.0.0.1")
            for name in cmd["env"]:
                del os.environ[name]
            backend.register([MemoryRegion(t.data_ptr(), t.nbytes, "cpu") for t in pool])
            backends[cmd["label"]] = backend
            reply(metadata=base64.b64encode(backend.local_metadata()).decode())
        elif op == "add_peer":
            reply(peer=backends[cmd["label"]].add_peer(base64.b64decode(cmd["metadata"])))
        elif op == "write":
            backend = backends[cmd["label"]]
            src, dst = paired_kv_ranges([t.data_ptr() for t in pool], cmd["dst_bases"], ITEM_BYTES,
                                        np.array(cmd["src_slots"]), np.array(cmd["dst_slots"]))
            start = time.monotonic()
            try:
                handle = backend.write(cmd["peer"], src, dst)
                while (state := backend.status(handle)) is TransferStatus.PENDING:
                    if time.monotonic() - start > cmd["timeout"]:
                        break
                    time.sleep(0.001)
                backend.release(handle)
                result = state.value
            except TransferError as e:
                result = f"error: {e}"
            reply(result=result, elapsed=time.monotonic() - start, rows=len(src))
        elif op == "dump":
            Path(cmd["path"]).write_bytes(b"".join(t.view(torch.uint8).numpy().tobytes() for t in pool))
            reply()
        elif op == "zero":
            for t in pool:
                t.zero_()
            reply()
        elif op == "exit":
            for backend in backends.values():
                backend.close()
            reply()
            return


# ---------------------------------------------------------------- the test side

class Peer:
    def __init__(self) -> None:
        env = {**os.environ, "UCX_TLS": "tcp", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, cwd=Path(__file__).parents[2])

    def call(self, wait_s: float = 60.0, **cmd: object) -> dict:
        self.proc.stdin.write(msgspec.json.encode(cmd) + b"\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], wait_s)
        assert ready, f"peer gave no answer to {cmd['op']} within {wait_s} s"
        line = self.proc.stdout.readline()
        assert line, f"peer exited (rc {self.proc.poll()}) on {cmd['op']}"
        return msgspec.json.decode(line)

    def exit(self) -> int:
        if self.proc.poll() is None:
            self.call(op="exit")
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


def pool_bytes(peer: Peer, path: Path) -> np.ndarray:
    peer.call(op="dump", path=str(path))
    return np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(2 * LAYERS, SLOTS, ITEM_BYTES)


def add_backend(peer: Peer, backend: str, agent: str, label: str = "main", env: dict[str, str] | None = None) -> str:
    """Creates and registers a backend in `peer`; returns its metadata, base64."""
    return peer.call(op="backend", backend=backend, agent=agent, label=label, env=env or {})["metadata"]


@dataclass
class Pair:
    backend: str
    receiver: Peer    # a zeroed pool
    writer: Peer      # a random pool
    bases: list[int]  # the receiver's buffer addresses
    peer: str         # the writer's key for the receiver
    started: list[Peer]  # every process to kill at the end


@pytest.fixture
def pair(request):
    """A receiver and a writer, each with a backend labelled "main" of kind `request.param`.
    Every process in `started` is killed afterwards, whatever happened."""
    backend = request.param
    receiver, writer = Peer(), Peer()  # both start importing at once
    started = [receiver, writer]
    try:
        bases = receiver.call(op="pool", seed=None)["bases"]
        writer.call(op="pool", seed=1)
        md = add_backend(receiver, backend, f"decode-{backend}")
        add_backend(writer, backend, f"prefill-{backend}")
        peer = writer.call(op="add_peer", label="main", metadata=md)["peer"]
        assert writer.call(op="add_peer", label="main", metadata=md)["peer"] == peer  # idempotent
        yield Pair(backend, receiver, writer, bases, peer, started)
    finally:
        for p in started:
            p.kill()


def write(writer: Peer, peer: str, bases: list[int], timeout: float = 30.0, label: str = "main") -> dict:
    return writer.call(op="write", label=label, peer=peer, dst_bases=bases, src_slots=SRC_SLOTS,
                       dst_slots=DST_SLOTS, timeout=timeout)


def assert_landed(receiver: Peer, writer: Peer, tmp_path: Path) -> None:
    """The receiver holds the sender's bytes in exactly DST_SLOTS, and zeros elsewhere."""
    got, sent = pool_bytes(receiver, tmp_path / "r"), pool_bytes(writer, tmp_path / "w")
    assert sent[:, SRC_SLOTS].any()
    assert np.array_equal(got[:, DST_SLOTS], sent[:, SRC_SLOTS])
    assert not got[:, np.setdiff1d(np.arange(SLOTS), DST_SLOTS)].any()


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_scattered_slots_land_exactly_after_a_refused_write(pair, tmp_path):
    """A write outside the peer's memory is refused: NIXL checks the rows against the peer's
    registrations before sending (TransferError); Mooncake's receiver rejects them (FAILED) and
    the next write goes through a fresh engine. Then a real write lands, slot for slot."""
    receiver, writer, bases, peer = pair.receiver, pair.writer, pair.bases, pair.peer
    answer = write(writer, peer, [b + (1 << 40) for b in bases])
    if pair.backend == "nixl":
        assert answer["result"].startswith("error:") and "registered memory" in answer["result"], answer
    else:
        assert answer["result"] == "failed", answer
    assert not pool_bytes(receiver, tmp_path / "r").any()
    answer = write(writer, peer, bases)
    assert answer["result"] == "done", answer
    # the runs merged: 14 slots in 7 runs on both sides (5-8/10-13 split at 20/3, ...)
    assert answer["rows"] == 2 * LAYERS * 7
    assert_landed(receiver, writer, tmp_path)
    assert writer.exit() == 0 and receiver.exit() == 0  # no crash at exit (gotcha N1)


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_dead_peer_fails_within_bound_and_its_restart_is_writable(pair, tmp_path):
    receiver, writer, bases, peer = pair.receiver, pair.writer, pair.bases, pair.peer
    assert write(writer, peer, bases)["result"] == "done"  # the connection is up
    receiver.kill()
    answer = write(writer, peer, bases, timeout=DEAD_PEER_BOUND_S)
    assert answer["result"] == "failed" or answer["result"].startswith("error:"), answer
    assert answer["elapsed"] < DEAD_PEER_BOUND_S
    # the decode server comes back under the same agent name, with new memory
    restarted = Peer()
    pair.started.append(restarted)
    new_bases = restarted.call(op="pool", seed=None)["bases"]
    md = add_backend(restarted, pair.backend, f"decode-{pair.backend}")
    new_peer = writer.call(op="add_peer", label="main", metadata=md)["peer"]
    assert write(writer, new_peer, new_bases)["result"] == "done"
    assert_landed(restarted, writer, tmp_path)
    assert restarted.exit() == 0 and writer.exit() == 0


@pytest.mark.parametrize("pair", BACKENDS, indirect=True)
def test_injected_failure_and_delay(pair, tmp_path):
    """Two more writer backends in the same process: one whose writes all fail (and send
    nothing), one whose writes stay PENDING for `delay` after they completed."""
    receiver, writer, bases, backend = pair.receiver, pair.writer, pair.bases, pair.backend
    md = add_backend(receiver, backend, f"decode2-{backend}", label="again")  # a second agent to write to
    delay = 1.5
    add_backend(writer, backend, f"failing-{backend}", "fail", {"MESHSERVE_DISAGG_TEST_FAILURE_PROB": "1.0"})
    add_backend(writer, backend, f"slow-{backend}", "delay", {"MESHSERVE_DISAGG_TEST_DELAY_S": str(delay)})
    fail_peer = writer.call(op="add_peer", label="fail", metadata=md)["peer"]
    delay_peer = writer.call(op="add_peer", label="delay", metadata=md)["peer"]
    assert write(writer, fail_peer, bases, label="fail")["result"] == "failed"
    assert not pool_bytes(receiver, tmp_path / "r").any()
    answer = write(writer, delay_peer, bases, label="delay")
    assert answer["result"] == "done"
    assert delay <= answer["elapsed"] < delay + 10
    assert_landed(receiver, writer, tmp_path)
    assert writer.exit() == 0 and receiver.exit() == 0


if __name__ == "__main__":
    serve()
