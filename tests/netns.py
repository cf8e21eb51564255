"""Two test hosts on this machine: network namespaces A (SUBNET.1) and B (SUBNET.2) joined by a
veth pair, created by the test itself and deleted afterwards. Root and iproute2 only; the
test is skipped otherwise."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

SUBNET = "10.213.77"  # addresses that only exist inside the namespaces the test creates


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    tag = f"{os.getpid() % 100000}"
    ns_a, ns_b = f"msA{tag}", f"msB{tag}"
    veth_a, veth_b = f"msa{tag}", f"msb{tag}"

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    try:
        try:
            sh("ip", "netns", "add", ns_a)
            sh("ip", "netns", "add", ns_b)
            sh("ip", "link", "add", veth_a, "netns", ns_a, "type", "veth", "peer", "name", veth_b, "netns", ns_b)
            for ns, dev, host in ((ns_a, veth_a, 1), (ns_b, veth_b, 2)):
                sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{host}/24", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
        except subprocess.CalledProcessError as err:
            pytest.skip(f"cannot set up network namespaces: {err.stderr.decode().strip()}")
        yield ns_a, ns_b
    finally:
        for ns in (ns_a, ns_b):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
