"""NIXL (NVIDIA Inference Xfer Library) over its UCX backend.

Settings, from measurements on our CPU box (shared/notes/kv-transfer.md):
- The progress thread is on, but sleeping: over TCP the *receiving* agent must progress its UCX
  worker for a WRITE to land (measured: with `enable_prog_thread=False` a write to an agent that
  makes no NIXL calls never completes), and the decode side has nothing to poll with. NIXL's
  Python wrapper hard-codes the thread's delay to 0, which busy-spins a core per agent (N2); with
  `PROGRESS_DELAY_US` the thread blocks in poll() on UCX's event descriptors instead and wakes on
  traffic (measured in one process: idle CPU 0.1 % instead of 100 %; 64 MiB writes over TCP
  at 1.7-2.2 GB/s, 1.2-3.2 GB/s with the spinning thread).
- env defaults, applied before the first agent exists and only when the user has not set them:
  `NIXL_LOG_LEVEL=WARN` (N8); on a loopback host `UCX_NET_DEVICES=lo`, because UCX's TCP
  transport otherwise spreads a transfer over every interface (N4); without named RDMA devices
  `UCX_MODULES=^ib`, which also keeps a Debian `ibverbs-providers` from making every process
  segfault at exit (N1); with named devices `UCX_NET_DEVICES` = their ports. `UCX_TLS` is left
  alone: on one host UCX then moves CPU memory with CMA and GPU memory with cuda_ipc, and
  forcing `tcp` would slow both; tests that want the network path export `UCX_TLS=tcp`.
  `UCX_MODULES` is read once per process, when the first agent loads UCX.
- A peer's metadata describes its registrations at the time it was taken: writes through stale
  metadata still land on TCP/CMA (no rkey revocation, N5), so `add_peer` with different
  metadata under a known name replaces the old entry.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

from meshserve.disagg.transfer import metadata
from meshserve.disagg.transfer.base import (MemoryRegion, TransferBackend, TransferError, TransferHandle,
                                            TransferStatus, checked_rows, single_device)
from meshserve.disagg.transfer.env import ib_ports, is_loopback, set_default

PIP_PACKAGE = "nixl-cu13"
PROGRESS_DELAY_US = 100_000  # the progress thread's poll() timeout: its wake-up rate when idle
_MEM_TYPE = {"cpu": "DRAM", "cuda": "VRAM"}
_STATE = {"DONE": TransferStatus.DONE, "PROC": TransferStatus.PENDING, "ERR": TransferStatus.FAILED}


def _import_nixl() -> ModuleType:
    # The `nixl` meta package picks the wheel matching torch's CUDA; either wheel alone also
    # works, and both run on CPU-only machines.
    for module in ("nixl._api", "nixl_cu13._api", "nixl_cu12._api"):
        try:
            return importlib.import_module(module)
        except ImportError:
            continue
    raise TransferError(f"the nixl transfer backend needs NIXL: pip install 'meshserve[disagg]' "
                        f"(package {PIP_PACKAGE}, or nixl-cu12 on CUDA 12 machines)")


def _apply_env_defaults(host: str, ib_devices: list[str] | None) -> None:
    set_default("NIXL_LOG_LEVEL", "WARN")
    if ib_devices:
        set_default("UCX_NET_DEVICES", ",".join(ib_ports(ib_devices)))
        return
    set_default("UCX_MODULES", "^ib")
    if is_loopback(host):
        set_default("UCX_NET_DEVICES", "lo")


def _sleeping_progress_agent(api: ModuleType, agent_name: str) -> object:
    """A UCX agent whose progress thread sleeps PROGRESS_DELAY_US in poll(). `nixl_agent` builds
    its own config and sets `pthrDelay = 0` just before creating the C++ agent, so the binding
    it calls is swapped, for this one construction, for one that sets the delay first."""
    make_agent = api.nixlBind.nixlAgent

    def with_delay(name: str, config: object) -> object:
        config.pthrDelay = PROGRESS_DELAY_US
        return make_agent(name, config)

    api.nixlBind.nixlAgent = with_delay
    try:
        return api.nixl_agent(agent_name, api.nixl_agent_config(enable_prog_thread=True, backends=["UCX"]))
    finally:
        api.nixlBind.nixlAgent = make_agent


class NixlBackend(TransferBackend):
    name = "nixl"

    def __init__(self, *, agent_name: str, host: str, ib_devices: list[str] | None = None) -> None:
        _apply_env_defaults(host, ib_devices)
        api = _import_nixl()
        bindings = importlib.import_module(api.__name__.rsplit(".", 1)[0] + "._bindings")
        # Every NIXL error type derives straight from Exception: collect them to catch only these.
        self._errors = tuple(getattr(bindings, n) for n in dir(bindings)
                             if n.startswith("nixl") and n.endswith("Error"))
        self._agent = _sleeping_progress_agent(api, agent_name)
        if "UCX" not in self._agent.backends:
            raise TransferError("NIXL loaded without its UCX plugin; reinstall nixl")
        self._agent_name = agent_name
        self._reg = None
        self._device = ("cpu", 0)
        self._peers: dict[str, metadata.PeerMetadata] = {}
        self._xfers: dict[TransferHandle, object] = {}  # handle -> nixl_xfer_handle, or a final status
        self._closed = False

    def register(self, regions: list[MemoryRegion]) -> None:
        if self._reg is not None:
            raise TransferError("register() is called once, with all of the KV pool's buffers")
        self._device = single_device(regions)
        descs = [(r.addr, r.length, r.device_id, "") for r in regions]
        self._reg = self._agent.register_memory(descs, _MEM_TYPE[self._device[0]])

    def local_metadata(self) -> bytes:
        if self._reg is None:
            raise TransferError("local_metadata() before register(): a peer could not write to us")
        device, device_id = self._device
        return metadata.encode(metadata.PeerMetadata(
            backend=self.name, agent=self._agent_name, device=device, device_id=device_id,
            blob=self._agent.get_agent_metadata()))

    def add_peer(self, data: bytes) -> str:
        md = metadata.decode(data, backend=self.name)
        known = self._peers.get(md.agent)
        if known == md:
            return md.agent
        if known is not None:  # the peer restarted or re-registered: drop the stale descriptors
            self._agent.remove_remote_agent(md.agent)
        loaded = self._agent.add_remote_agent(md.blob)
        loaded = loaded.decode() if isinstance(loaded, bytes) else loaded  # bytes in 1.5.1 (N8)
        if loaded != md.agent:
            raise TransferError(f"peer metadata names agent {md.agent!r} but NIXL loaded {loaded!r}")
        self._peers[md.agent] = md
        return md.agent

    def remove_peer(self, peer: str) -> None:
        if self._peers.pop(peer, None) is not None:
            self._agent.remove_remote_agent(peer)

    def write(self, peer: str, src: np.ndarray, dst: np.ndarray) -> TransferHandle:
        src, dst = checked_rows(src, dst)
        md = self._peers.get(peer)
        if md is None:
            raise TransferError(f"unknown peer {peer!r}: add_peer() its metadata first")
        device, device_id = self._device
        local = self._agent.get_xfer_descs(_descs(src, device_id), _MEM_TYPE[device])
        remote = self._agent.get_xfer_descs(_descs(dst, md.device_id), _MEM_TYPE[md.device])
        try:  # checked here, against both registrations: a bad address never reaches the wire
            xfer = self._agent.initialize_xfer("WRITE", local, remote, peer)
        except self._errors as e:
            raise TransferError(f"NIXL refused the write to {peer!r} ({type(e).__name__}: {e}); "
                                f"are all rows inside registered memory?") from e
        handle = TransferHandle.new(peer)
        try:
            state = _STATE[self._agent.transfer(xfer)]
        except self._errors:  # e.g. nixlRemoteDisconnectError from a dead peer (N5)
            state = TransferStatus.FAILED
        self._xfers[handle] = xfer if state is TransferStatus.PENDING else state
        if state is not TransferStatus.PENDING:
            self._release_xfer(xfer)
        return handle

    def status(self, handle: TransferHandle) -> TransferStatus:
        xfer = self._xfers.get(handle)
        if xfer is None:
            raise TransferError(f"unknown or released transfer handle {handle}")
        if isinstance(xfer, TransferStatus):
            return xfer
        try:
            state = _STATE[self._agent.check_xfer_state(xfer)]  # cheap: the thread drives progress
        except self._errors:
            state = TransferStatus.FAILED
        if state is not TransferStatus.PENDING:
            self._xfers[handle] = state
            self._release_xfer(xfer)
        return state

    def release(self, handle: TransferHandle) -> None:
        xfer = self._xfers.pop(handle, None)
        if xfer is not None and not isinstance(xfer, TransferStatus):
            self._release_xfer(xfer)

    def _release_xfer(self, xfer: object) -> None:
        try:  # NIXL cancels an active transfer; one it cannot cancel stays with the agent
            self._agent.release_xfer_handle(xfer)
        except self._errors:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in list(self._xfers):
            self.release(handle)
        for peer in list(self._peers):
            self.remove_peer(peer)
        if self._reg is not None:
            self._agent.deregister_memory(self._reg)
            self._reg = None


def _descs(rows: np.ndarray, device_id: int) -> np.ndarray:
    """(address, length) rows as NIXL's (N, 3) uint64 (address, length, device id) descriptors."""
    out = np.empty((rows.shape[0], 3), dtype=np.uint64)
    out[:, :2] = rows
    out[:, 2] = device_id
    return out
