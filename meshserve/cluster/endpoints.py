"""Addresses of the ZMQ link between the TokenizerManager and the scheduler leader."""

from __future__ import annotations

import os
import tempfile
import uuid
from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerEndpoints:
    to_scheduler: str  # the TokenizerManager binds a PUSH socket here; the scheduler connects a PULL
    from_scheduler: str  # the TokenizerManager binds a PULL socket here; the scheduler connects a PUSH

    @classmethod
    def new_ipc(cls) -> SchedulerEndpoints:
        """Fresh Unix-socket paths in a private (0700) directory: local to this machine, and
        unreachable by other users."""
        base = tempfile.mkdtemp(prefix=f"meshserve-{uuid.uuid4().hex[:8]}-")
        os.chmod(base, 0o700)
        return cls(to_scheduler=f"ipc://{base}/to_scheduler", from_scheduler=f"ipc://{base}/from_scheduler")
