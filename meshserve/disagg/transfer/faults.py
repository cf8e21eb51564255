"""Failure injection for tests of the PD protocol, wrapped around any backend by `create_backend`
when one of these is set in the environment:

  MESHSERVE_DISAGG_TEST_FAILURE_PROB  a write fails with this probability: its status is FAILED
                                      and nothing is sent (the real write never starts)
  MESHSERVE_DISAGG_TEST_DELAY_S       a write's status stays PENDING this long after the real
                                      transfer completed (its bytes have already landed)
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass

import numpy as np

from meshserve.disagg.transfer.base import (MemoryRegion, TransferBackend, TransferError, TransferHandle,
                                            TransferStatus, checked_rows)

FAILURE_PROB_ENV = "MESHSERVE_DISAGG_TEST_FAILURE_PROB"
DELAY_ENV = "MESHSERVE_DISAGG_TEST_DELAY_S"


@dataclass(frozen=True)
class FaultConfig:
    failure_prob: float = 0.0
    delay_s: float = 0.0

    @staticmethod
    def from_env() -> FaultConfig:
        def number(name: str, upper: float) -> float:
            raw = os.environ.get(name, "")
            try:
                value = float(raw) if raw else 0.0
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number") from None
            if not 0.0 <= value <= upper:
                raise ValueError(f"{name}={raw!r} must be between 0 and {upper}")
            return value
        return FaultConfig(number(FAILURE_PROB_ENV, 1.0), number(DELAY_ENV, float("inf")))

    @property
    def active(self) -> bool:
        return self.failure_prob > 0.0 or self.delay_s > 0.0


@dataclass
class _Injected:
    inner: TransferHandle | None  # None: an injected failure, never sent
    done_at: float | None = None  # monotonic time the real transfer was first seen DONE


class FaultInjectingBackend(TransferBackend):
    """Delegates everything to `inner`; only `write` and `status` are altered."""

    def __init__(self, inner: TransferBackend, config: FaultConfig, *, seed: int | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self._config = config
        self._random = random.Random(seed)
        self._handles: dict[TransferHandle, _Injected] = {}

    def register(self, regions: list[MemoryRegion]) -> None:
        self.inner.register(regions)

    def local_metadata(self) -> bytes:
        return self.inner.local_metadata()

    def add_peer(self, metadata: bytes) -> str:
        return self.inner.add_peer(metadata)

    def remove_peer(self, peer: str) -> None:
        self.inner.remove_peer(peer)

    def write(self, peer: str, src: np.ndarray, dst: np.ndarray) -> TransferHandle:
        checked_rows(src, dst)  # a caller's malformed rows fail the same with or without injection
        handle = TransferHandle.new(peer)
        if self._random.random() < self._config.failure_prob:
            self._handles[handle] = _Injected(None)
        else:
            self._handles[handle] = _Injected(self.inner.write(peer, src, dst))
        return handle

    def status(self, handle: TransferHandle) -> TransferStatus:
        injected = self._handles.get(handle)
        if injected is None:
            raise TransferError(f"unknown or released transfer handle {handle}")
        if injected.inner is None:
            return TransferStatus.FAILED
        if injected.done_at is None:
            state = self.inner.status(injected.inner)
            if state is not TransferStatus.DONE:
                return state
            injected.done_at = time.monotonic()
        done = time.monotonic() - injected.done_at >= self._config.delay_s
        return TransferStatus.DONE if done else TransferStatus.PENDING

    def release(self, handle: TransferHandle) -> None:
        injected = self._handles.pop(handle, None)
        if injected is not None and injected.inner is not None:
            self.inner.release(injected.inner)

    def close(self) -> None:
        self._handles.clear()
        self.inner.close()
