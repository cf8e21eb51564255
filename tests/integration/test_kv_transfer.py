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


def start_pair(backend: str, writer_env: dict[str, str]) -> tuple[Peer, Peer, list[int], str]:
    """A zeroed receiver and a writer with a random pool; returns both, the receiver's buffer
    addresses and the writer's key for it."""
    receiver, writer = Peer(), Peer()
    bases = receiver.call(op="pool", seed=None)["bases"]
    writer.call(op="pool", seed=1)
    md = receiver.call(op="backend", backend=backend, agent=f"decode-{backend}", label="main", env={})["metadata"]
    writer.call(op="backend", backend=backend, agent=f"prefill-{backend}", label="main", env=writer_env)
    peer = writer.call(op="add_peer", label="main", metadata=md)["peer"]
    assert writer.call(op="add_peer", label="main", metadata=md)["peer"] == peer  # idempotent
    return receiver, writer, bases, peer


@pytest.fixture
def pairs():
    started: list[Peer] = []

    def make(backend: str, writer_env: dict[str, str] | None = None):
        receiver, writer, bases, peer = start_pair(backend, writer_env or {})
        started.extend([receiver, writer])
        return receiver, writer, bases, peer

    yield make
    for p in started:
        p.kill()


def write(writer: Peer, peer: str, bases: list[int], timeout: float = 30.0) -> dict:
    return writer.call(op="write", label="main", peer=peer, dst_bases=bases, src_slots=SRC_SLOTS,
                       dst_slots=DST_SLOTS, timeout=timeout)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scattered_slots_land_exactly(backend, pairs, tmp_path):
    receiver, writer, bases, peer = pairs(backend)
    answer = write(writer, peer, bases)
    assert answer["result"] == "done", answer
    # the runs merged: 14 slots in 7 runs on both sides (5-8/10-13 split at 20/3, ...)
    assert answer["rows"] == 2 * LAYERS * 7
    got, sent = pool_bytes(receiver, tmp_path / "r"), pool_bytes(writer, tmp_path / "w")
    assert sent[:, SRC_SLOTS].any()
    assert np.array_equal(got[:, DST_SLOTS], sent[:, SRC_SLOTS])
    untouched = np.setdiff1d(np.arange(SLOTS), DST_SLOTS)
    assert not got[:, untouched].any()
    assert writer.exit() == 0 and receiver.exit() == 0  # no crash at exit (gotcha N1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dead_peer_fails_within_bound(backend, pairs):
    receiver, writer, bases, peer = pairs(backend)
    assert write(writer, peer, bases)["result"] == "done"  # the connection is up
    receiver.kill()
    answer = write(writer, peer, bases, timeout=DEAD_PEER_BOUND_S)
    assert answer["result"] == "failed" or answer["result"].startswith("error:"), answer
    assert answer["elapsed"] < DEAD_PEER_BOUND_S
    assert writer.exit() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_outside_peer_memory_is_refused_and_the_peer_stays_usable(backend, pairs, tmp_path):
    """NIXL checks the rows against the peer's registrations before sending (TransferError);
    Mooncake's receiver rejects them (FAILED), and the next write goes through a fresh engine."""
    receiver, writer, bases, peer = pairs(backend)
    answer = write(writer, peer, [b + (1 << 40) for b in bases])
    if backend == "nixl":
        assert answer["result"].startswith("error:") and "registered memory" in answer["result"], answer
    else:
        assert answer["result"] == "failed", answer
    assert not pool_bytes(receiver, tmp_path / "r").any()
    assert write(writer, peer, bases)["result"] == "done"
    assert writer.exit() == 0 and receiver.exit() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_injected_failure_writes_nothing(backend, pairs, tmp_path):
    receiver, writer, bases, peer = pairs(backend, {"MESHSERVE_DISAGG_TEST_FAILURE_PROB": "1.0"})
    assert write(writer, peer, bases)["result"] == "failed"
    assert not pool_bytes(receiver, tmp_path / "r").any()
    assert writer.exit() == 0 and receiver.exit() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_injected_delay_keeps_pending_then_done(backend, pairs, tmp_path):
    delay = 1.5
    receiver, writer, bases, peer = pairs(backend, {"MESHSERVE_DISAGG_TEST_DELAY_S": str(delay)})
    answer = write(writer, peer, bases)
    assert answer["result"] == "done"
    assert delay <= answer["elapsed"] < delay + 10
    got, sent = pool_bytes(receiver, tmp_path / "r"), pool_bytes(writer, tmp_path / "w")
    assert np.array_equal(got[:, DST_SLOTS], sent[:, SRC_SLOTS])
    assert writer.exit() == 0 and receiver.exit() == 0


if __name__ == "__main__":
    serve()
