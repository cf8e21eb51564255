"""The Mooncake Transfer Engine, peer-to-peer (`P2PHANDSHAKE`: no etcd), TCP unless RDMA
devices are named.

Shaped by gotchas measured on 0.3.13.post1 (shared/notes/kv-transfer.md):
- M1: once the TCP transport rejects a batch for a full per-peer queue, that engine's path to
  that peer fails every later transfer. So (a) the queue limits are raised to their maximum,
  65535, before the library loads; (b) each peer gets its own initiator engine and worker
  thread that submits at most `MAX_ENTRIES_PER_BATCH` rows at a time and waits for them before
  the next batch, so our in-flight entries per peer stay far below the limit; (c) a failed batch
  discards that peer's engine and the next write builds a fresh one. The engine whose session id
  `local_metadata` publishes only receives, so rebuilding a path never changes what peers hold.
- M2: `"rdma"` without an HCA silently falls back to TCP, so the protocol is chosen explicitly.
- M5: `MC_LOG_LEVEL=ERROR` unless set (glog prints ~20 INFO lines per engine pair).
- M7: `get_batch_transfer_status` blocks (and spins) until the batch ends; it runs on the peer's
  worker thread (the call releases the GIL), so `write` and `status` never block the caller.
- The receiving engine checks every destination address against its registrations: a write
  outside them fails (FAILED), and its memory stays untouched.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import numpy as np

from meshserve.disagg.transfer import metadata
from meshserve.disagg.transfer.base import (MemoryRegion, TransferBackend, TransferError, TransferHandle,
                                            TransferStatus, checked_rows, rows_outside, single_device)
from meshserve.disagg.transfer.env import set_default

PIP_PACKAGE = "mooncake-transfer-engine-non-cuda"
MAX_ENTRIES_PER_BATCH = 1024  # the library's default per-peer queue; 65535 is only the backstop
_MAX_QUEUE = "65535"  # the largest value the TCP transport accepts
_JOIN_TIMEOUT_S = 5.0

log = logging.getLogger(__name__)


def _import_engine() -> type:
    # Read when the TCP transport starts; set before import so the first engine sees them.
    set_default("MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER", _MAX_QUEUE)
    set_default("MC_TCP_MAX_PENDING_ADMISSIONS_PER_PEER", _MAX_QUEUE)
    set_default("MC_LOG_LEVEL", "ERROR")
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:  # also the CUDA build on a machine without libcudart (M8)
        raise TransferError(f"the mooncake transfer backend needs Mooncake: pip install 'meshserve[disagg]' "
                            f"(package {PIP_PACKAGE}; it also needs the system library libibverbs1) ({e})") from e
    return TransferEngine


def _supports_cuda() -> bool:
    from mooncake import engine
    return bool(engine.SUPPORT_CUDA)


@dataclass
class _Job:
    src: np.ndarray
    dst: np.ndarray
    state: TransferStatus = TransferStatus.PENDING  # written by the worker thread only
    cancelled: bool = False


@dataclass
class _EngineSpec:
    engine_cls: type
    host: str
    protocol: str
    devices: str
    regions: list[MemoryRegion] = field(default_factory=list)

    def create(self) -> object:
        engine = self.engine_cls()
        rc = engine.initialize(self.host, "P2PHANDSHAKE", self.protocol, self.devices)
        if rc != 0:
            raise TransferError(f"Mooncake engine failed to start on {self.host} ({self.protocol}), rc={rc}")
        if self.regions:  # RDMA needs local sources registered; TCP does not, but costs nothing
            rc = engine.batch_register_memory([r.addr for r in self.regions], [r.length for r in self.regions])
            if rc != 0:
                raise TransferError(f"Mooncake refused to register the KV buffers, rc={rc}")
        return engine


class _PeerPath:
    """The writes to one peer: its own engine, and a thread running them one batch at a time."""

    def __init__(self, spec: _EngineSpec, session: str) -> None:
        self._spec = spec
        self._session = session
        self._engine: object | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"mooncake-{session}", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(_JOIN_TIMEOUT_S)  # a batch to a hung peer ends at Mooncake's own timeout

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not job.cancelled:
                job.state = TransferStatus.DONE if self._transfer(job) else TransferStatus.FAILED

    def _transfer(self, job: _Job) -> bool:
        try:
            if self._engine is None:
                self._engine = self._spec.create()
        except TransferError as e:
            log.warning("mooncake path to %s: %s", self._session, e)
            return False
        for start in range(0, job.src.shape[0], MAX_ENTRIES_PER_BATCH):
            src = job.src[start : start + MAX_ENTRIES_PER_BATCH]
            dst = job.dst[start : start + MAX_ENTRIES_PER_BATCH]
            batch = self._engine.batch_transfer_async_write(
                self._session, src[:, 0].tolist(), dst[:, 0].tolist(), src[:, 1].tolist())
            # A batch id is a pointer: 0 (seen for an unreachable peer) or -1, which may come
            # back read as unsigned, means the submit failed and there is no batch to wait on.
            if not 0 < batch < 1 << 63 or self._engine.get_batch_transfer_status([batch]) != 0:
                self._engine = None  # M1: this engine's path to the peer may be broken for good
                return False
        return True


class MooncakeBackend(TransferBackend):
    name = "mooncake"

    def __init__(self, *, agent_name: str, host: str, ib_devices: list[str] | None = None) -> None:
        engine_cls = _import_engine()
        self._spec = _EngineSpec(engine_cls, host, "rdma" if ib_devices else "tcp", ",".join(ib_devices or []))
        self._agent_name = agent_name
        self._target = self._spec.create()  # receives; its session id is what peers hold
        self._session = f"{host}:{self._target.get_rpc_port()}"
        self._regions: list[MemoryRegion] = []
        self._device = ("cpu", 0)
        self._peers: dict[str, _PeerPath] = {}
        self._jobs: dict[TransferHandle, _Job] = {}
        self._closed = False

    def register(self, regions: list[MemoryRegion]) -> None:
        if self._regions:
            raise TransferError("register() is called once, with all of the KV pool's buffers")
        self._device = single_device(regions)
        if self._device[0] == "cuda" and not _supports_cuda():
            raise TransferError("this Mooncake build has no CUDA support; GPU machines need "
                                "mooncake-transfer-engine (CUDA 12) or mooncake-transfer-engine-cuda13 (M8)")
        rc = self._target.batch_register_memory([r.addr for r in regions], [r.length for r in regions])
        if rc != 0:
            raise TransferError(f"Mooncake refused to register the KV buffers, rc={rc}")
        self._regions = list(regions)
        self._spec.regions = self._regions

    def local_metadata(self) -> bytes:
        if not self._regions:
            raise TransferError("local_metadata() before register(): a peer could not write to us")
        device, device_id = self._device
        return metadata.encode(metadata.PeerMetadata(
            backend=self.name, agent=self._agent_name, device=device, device_id=device_id,
            blob=self._session.encode()))

    def add_peer(self, data: bytes) -> str:
        session = metadata.decode(data, backend=self.name).blob.decode()
        # The session id (host:rpc port) is the key: a restarted peer gets a new port, so its
        # new metadata makes a new path, and the old one is removed by whoever saw it leave.
        if session not in self._peers:
            self._peers[session] = _PeerPath(self._spec, session)
        return session

    def remove_peer(self, peer: str) -> None:
        path = self._peers.pop(peer, None)
        if path is not None:
            path.stop()

    def write(self, peer: str, src: np.ndarray, dst: np.ndarray) -> TransferHandle:
        src, dst = checked_rows(src, dst)
        path = self._peers.get(peer)
        if path is None:
            raise TransferError(f"unknown peer {peer!r}: add_peer() its metadata first")
        outside = rows_outside(src, self._regions) if self._regions else np.arange(len(src))
        if outside.size:
            raise TransferError(f"{outside.size} source row(s) lie outside the registered memory "
                                f"(first: row {outside[0]}, {src[outside[0]].tolist()})")
        handle = TransferHandle.new(peer)
        self._jobs[handle] = job = _Job(src, dst)
        path.submit(job)
        return handle

    def status(self, handle: TransferHandle) -> TransferStatus:
        job = self._jobs.get(handle)
        if job is None:
            raise TransferError(f"unknown or released transfer handle {handle}")
        return job.state

    def release(self, handle: TransferHandle) -> None:
        job = self._jobs.pop(handle, None)
        if job is not None:
            job.cancelled = True  # a job not yet started is skipped; a running one just finishes

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in list(self._jobs):
            self.release(handle)
        for peer in list(self._peers):
            self.remove_peer(peer)
        if self._regions:
            self._target.batch_unregister_memory([r.addr for r in self._regions])
