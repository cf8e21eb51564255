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
    # group's leader connects a PULL. On node 0 every entry is set; on a node r > 0 (relays of
    # meshserve.cluster.scheduler_link) only those of the groups it leads, the others are None.
    to_scheduler: tuple[str | None, ...]
    # The TokenizerManager binds one PULL socket here; every leader connects a PUSH.
    from_scheduler: str

    def inbox(self, dp_rank: int) -> str:
        """DP group ``dp_rank``'s inbox, which this node must reach (it runs the group's leader,
        or is node 0)."""
        address = self.to_scheduler[dp_rank]
        if address is None:
            raise ValueError(f"DP group {dp_rank}'s leader runs on another node")
        return address

    @classmethod
    def new_ipc(cls, dp_size: int = 1) -> SchedulerEndpoints:
        """Fresh Unix-socket paths in a private (0700) directory: local to this machine, and
        unreachable by other users."""
        base = tempfile.mkdtemp(prefix=f"meshserve-{uuid.uuid4().hex[:8]}-")
        os.chmod(base, 0o700)
        return cls(to_scheduler=tuple(f"ipc://{base}/to_scheduler_{d}" for d in range(dp_size)),
                   from_scheduler=f"ipc://{base}/from_scheduler")
