"""Debian packages that a test needs (real daemons: SLURM, etcd, NATS), installed when missing.

CI runs as root on Debian, where a failed install fails the test; without root the test is
skipped and says so, never presented as passing."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence

import pytest


def ensure_packages(packages: Sequence[str], binaries: Sequence[str]) -> None:
    """Install `packages` unless every one of `binaries` is already on PATH."""
    if all(shutil.which(b) for b in binaries):
        return
    if os.geteuid() != 0:
        pytest.skip(f"SKIPPED, NOT TESTED: installing {' '.join(packages)} needs root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages]):
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if out.returncode:  # as root (CI) an install that fails is a failure, never a skip
            pytest.fail(f"cannot install {' '.join(packages)}: {out.stderr[-500:]}")
