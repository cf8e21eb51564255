"""KV-transfer backends for prefill-decode disaggregation: see base.py for the interface and
docs/disaggregation.md ("Transfer backends") for the libraries, settings and gotchas."""

from __future__ import annotations

from meshserve.disagg.transfer.base import (MemoryRegion, TransferBackend, TransferError, TransferHandle,
                                            TransferStatus)
from meshserve.disagg.transfer.env import check_ib_devices
from meshserve.disagg.transfer.faults import FaultConfig, FaultInjectingBackend

BACKENDS = ("nixl", "mooncake")


def create_backend(name: str, *, agent_name: str, host: str,
                   ib_devices: list[str] | None = None) -> TransferBackend:
    """The named backend, wrapped for failure injection when the test variables are set
    (faults.py). Raises ValueError for an unknown name or an absent RDMA device, TransferError
    (naming the pip package) when the library is not installed."""
    check_ib_devices(ib_devices)
    faults = FaultConfig.from_env()  # read first: a bad value fails before a library loads
    backend = _backend_class(name)(agent_name=agent_name, host=host, ib_devices=ib_devices)
    return FaultInjectingBackend(backend, faults) if faults.active else backend


def _backend_class(name: str) -> type[TransferBackend]:
    # Imported on demand: a server must not need the library of the backend it does not use.
    if name == "nixl":
        from meshserve.disagg.transfer.nixl import NixlBackend
        return NixlBackend
    if name == "mooncake":
        from meshserve.disagg.transfer.mooncake import MooncakeBackend
        return MooncakeBackend
    raise ValueError(f"unknown transfer backend {name!r}; choose one of {', '.join(BACKENDS)}")


__all__ = ["BACKENDS", "MemoryRegion", "TransferBackend", "TransferError", "TransferHandle", "TransferStatus",
           "check_ib_devices", "create_backend"]
