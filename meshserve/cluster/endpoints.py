"""Addresses of the ZMQ links between the TokenizerManager and the scheduler leaders (one leader
per DP group; one with --dp-size 1)."""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerEndpoints:
    # One per DP group, in DP-rank order: the TokenizerManager binds a PUSH socket on each; that
    # group's leader connects a PULL.
    to_scheduler: tuple[str, ...]
    # The TokenizerManager binds one PULL socket here; every leader connects a PUSH.
    from_scheduler: str

    @classmethod
    def new_ipc(cls, dp_size: int = 1) -> SchedulerEndpoints:
        """Fresh Unix-socket paths in a private (0700) directory: local to this machine, and
        unreachable by other users."""
        base = tempfile.mkdtemp(prefix=f"meshserve-{uuid.uuid4().hex[:8]}-")
        os.chmod(base, 0o700)
        return cls(to_scheduler=tuple(f"ipc://{base}/to_scheduler_{d}" for d in range(dp_size)),
                   from_scheduler=f"ipc://{base}/from_scheduler")
