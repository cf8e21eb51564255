"""Environment defaults for the transfer libraries, which read their settings from environment
variables when they load or create a context. A value the user exported always wins: these are
only ever set when absent, and only for the cases each function names."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

IB_SYSFS = Path("/sys/class/infiniband")


def set_default(name: str, value: str) -> None:
    os.environ.setdefault(name, value)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it names a real interface


def check_ib_devices(names: list[str] | None) -> None:
    """Raise ValueError naming every RDMA device in `names` that this machine does not have, so
    a server refuses a misspelt or absent device at start-up instead of silently using TCP."""
    missing = [n for n in names or [] if not (IB_SYSFS / n).is_dir()]
    if missing:
        present = sorted(p.name for p in IB_SYSFS.iterdir()) if IB_SYSFS.is_dir() else []
        raise ValueError(f"RDMA device(s) {', '.join(missing)} not found in {IB_SYSFS} "
                         f"(present: {', '.join(present) or 'none'})")


def ib_ports(names: list[str]) -> list[str]:
    """UCX's spelling of the devices' ports, "mlx5_0:1", from sysfs."""
    return [f"{n}:{port.name}" for n in names for port in sorted((IB_SYSFS / n / "ports").iterdir())]
