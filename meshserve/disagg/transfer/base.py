"""The interface every KV-transfer backend implements: one-sided WRITEs of byte ranges from this
process's registered memory into a peer's registered memory.

A prefill server `write`s a request's KV rows into buffers that a decode server pre-allocated
and `register`ed; only the writer needs the other side's `local_metadata` (`add_peer`). The
control messages that carry the metadata and the destination addresses belong to the PD
protocol, not to this layer.

Errors come in two kinds: a mistake by the caller (an unknown peer, malformed rows, memory that
is not registered) raises `TransferError` or `ValueError` from `write`; a failure of the
transport (a dead peer, a refused queue) surfaces as `TransferStatus.FAILED` from `status`.
"""

from __future__ import annotations

import abc
import enum
import itertools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np


class TransferStatus(enum.Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class MemoryRegion:
    """One contiguous buffer of the KV pool (e.g. a layer's K tensor)."""

    addr: int
    length: int
    device: str  # "cpu" | "cuda"
    device_id: int = 0

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"MemoryRegion.device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.addr <= 0 or self.length <= 0:
            raise ValueError(f"MemoryRegion needs a positive address and length, got {self}")


_handle_ids = itertools.count(1)  # process-wide, so handles from different backends never compare equal


@dataclass(frozen=True)
class TransferHandle:
    """Names one `write`; the backend that returned it keeps the state until `release`."""

    id: int
    peer: str

    @staticmethod
    def new(peer: str) -> TransferHandle:
        return TransferHandle(next(_handle_ids), peer)


class TransferError(RuntimeError):
    """The backend cannot do what was asked; the message says what and why."""


def checked_rows(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """src and dst as int64 (N, 2) arrays of (address, length) rows, N >= 1, row i of src as long
    as row i of dst. Raises ValueError otherwise."""
    src = np.asarray(src)
    dst = np.asarray(dst)
    for name, rows in (("src", src), ("dst", dst)):
        if rows.ndim != 2 or rows.shape[1] != 2 or rows.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (N, 2) array of (address, length) rows, "
                             f"got shape {rows.shape}")
        if not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"{name} must hold integers, got {rows.dtype}")
    if src.shape != dst.shape:
        raise ValueError(f"src has {src.shape[0]} rows but dst has {dst.shape[0]}")
    src = src.astype(np.int64, copy=False)
    dst = dst.astype(np.int64, copy=False)
    if not np.array_equal(src[:, 1], dst[:, 1]):
        bad = int(np.flatnonzero(src[:, 1] != dst[:, 1])[0])
        raise ValueError(f"row {bad}: src length {src[bad, 1]} != dst length {dst[bad, 1]}")
    if (src[:, 1] <= 0).any() or (src[:, 0] <= 0).any() or (dst[:, 0] <= 0).any():
        raise ValueError("every row needs a positive address and length")
    return src, dst


def rows_outside(rows: np.ndarray, regions: list[MemoryRegion]) -> np.ndarray:
    """Indices of the (address, length) rows that do not lie wholly inside one of `regions`."""
    order = sorted(regions, key=lambda r: r.addr)
    starts = np.array([r.addr for r in order], dtype=np.int64)
    ends = starts + np.array([r.length for r in order], dtype=np.int64)
    i = np.searchsorted(starts, rows[:, 0], side="right") - 1  # the last region starting at or before
    ok = (i >= 0) & (rows[:, 0] + rows[:, 1] <= ends[np.maximum(i, 0)])
    return np.flatnonzero(~ok)


def single_device(regions: list[MemoryRegion]) -> tuple[str, int]:
    """The (device, device_id) shared by all regions: a KV pool lives on one device, and the
    peer describes our memory with that one pair (it travels in the metadata)."""
    if not regions:
        raise ValueError("register() needs at least one region")
    kinds = {(r.device, r.device_id) for r in regions}
    if len(kinds) != 1:
        raise ValueError(f"all registered regions must be on one device, got {sorted(kinds)}")
    return kinds.pop()


class TransferBackend(abc.ABC):
    name: ClassVar[str]  # "nixl" | "mooncake"

    @abc.abstractmethod
    def __init__(self, *, agent_name: str, host: str, ib_devices: list[str] | None = None) -> None:
        """agent_name must be unique among the peers; host is the address peers reach us on;
        ib_devices names RDMA devices to use (None: TCP only)."""

    @abc.abstractmethod
    def register(self, regions: list[MemoryRegion]) -> None:
        """Register the KV pool's buffers, once, before `local_metadata`."""

    @abc.abstractmethod
    def local_metadata(self) -> bytes:
        """Opaque, small blob a peer passes to `add_peer` to reach us (after `register`)."""

    @abc.abstractmethod
    def add_peer(self, metadata: bytes) -> str:
        """Make the peer described by `metadata` writable; idempotent. Returns its key."""

    @abc.abstractmethod
    def remove_peer(self, peer: str) -> None:
        """Forget a peer (after it restarted or left); unknown keys are ignored."""

    @abc.abstractmethod
    def write(self, peer: str, src: np.ndarray, dst: np.ndarray) -> TransferHandle:
        """Start copying each local src row into the peer's dst row; returns without waiting."""

    @abc.abstractmethod
    def status(self, handle: TransferHandle) -> TransferStatus:
        """Non-blocking; also drives progress where the library needs polling."""

    @abc.abstractmethod
    def release(self, handle: TransferHandle) -> None:
        """Forget a handle (normally after DONE or FAILED)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release every handle, peer and registration. The backend is unusable afterwards."""
