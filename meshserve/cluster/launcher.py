"""Starts this node's scheduler processes (one per local rank) and watches them."""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_sentinels

from meshserve.cluster.endpoints import SchedulerEndpoints
from meshserve.cluster.topology import Topology
from meshserve.config.server_args import ServerArgs

logger = logging.getLogger("meshserve")


@dataclass(frozen=True)
class RankExit:
    """A scheduler process that ended on its own (not stopped by this launcher)."""

    node_rank: int
    rank: int
    pid: int | None
    exitcode: int | None  # negative: killed by that signal (multiprocessing's convention)

    @property
    def decisive(self) -> bool:
        """Killed by a signal: a cause. An exit with a code may be the consequence of another
        rank's death (its collective failed), see meshserve.cluster.coordinator."""
        return self.exitcode is not None and self.exitcode < 0

    def describe(self) -> str:
        if self.decisive:
            assert self.exitcode is not None
            how = f"was killed by {signal.Signals(-self.exitcode).name}"
        else:
            how = f"exited with code {self.exitcode}"
        return f"scheduler rank {self.rank} on node {self.node_rank} (pid {self.pid}) {how}"


# The sentinel closes as a process releases its files, a moment before it can be reaped.
REAP_GRACE_S = 5.0


@dataclass
class SchedulerProcesses:
    """This node's scheduler processes. Every look at whether one lives (which may reap it) is
    made under one lock: two threads in waitpid on one child race, and the loser, told ECHILD,
    sees the reaped process as alive (multiprocessing's poll answers None), so a rank already
    gone was reported as ignoring SIGTERM and "killed" by a pid that may have been reused."""

    endpoints: SchedulerEndpoints | None  # None on a node that runs no DP group's leader
    topology: Topology
    processes: list[mp.process.BaseProcess] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _reap_lock: threading.Lock = field(default_factory=threading.Lock)

    def exits(self) -> list[RankExit]:
        """Every scheduler process that has ended, in local-rank order."""
        with self._reap_lock:
            return [RankExit(self.topology.node_rank, self.topology.global_rank(local_rank), proc.pid,
                             proc.exitcode)
                    for local_rank, proc in enumerate(self.processes) if not proc.is_alive()]

    def dead(self) -> str | None:
        """A description of the first scheduler process that has exited, or None if all live."""
        exits = self.exits()
        return exits[0].describe() if exits else None

    def _reap(self, proc: mp.process.BaseProcess, timeout: float) -> bool:
        """Wait up to `timeout` for `proc` to end, then reap it; True if it has ended."""
        ended = bool(wait_for_sentinels([proc.sentinel], timeout))
        with self._reap_lock:
            if ended:
                proc.join(REAP_GRACE_S)
            return not proc.is_alive()

    def watch(self, on_exit: Callable[[RankExit], None]) -> None:
        """Call ``on_exit`` (from a daemon thread) for the first rank that ends before
        :meth:`shutdown`, the moment it ends (process sentinels, no polling)."""

        def run() -> None:
            ended = wait_for_sentinels([proc.sentinel for proc in self.processes])
            for proc in self.processes:
                if proc.sentinel in ended:
                    self._reap(proc, 0)
            exits = self.exits()
            if exits and not self._stopping.is_set():
                on_exit(min(exits, key=lambda e: not e.decisive))  # a killed rank names it best

        threading.Thread(target=run, daemon=True, name="meshserve-rank-watch").start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._reap_lock:
            for proc in self.processes:
                if proc.is_alive():
                    proc.terminate()
        for proc in self.processes:
            if not self._reap(proc, timeout):
                logger.warning("scheduler pid %s ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                self._reap(proc, timeout)


def launch_schedulers(args: ServerArgs, rendezvous: str | None,
                      endpoints: SchedulerEndpoints | None) -> SchedulerProcesses:
    """One scheduler process per local rank, joining the world at `rendezvous` (host:port of the
    running rendezvous store; None for a single rank); this node's DP group leaders connect to
    `endpoints` (ClusterNode.scheduler_endpoints). `spawn`, not `fork`: the parent may
    already run threads (asyncio, tokenizers, the coordinator) that fork would corrupt. Every
    process resolves the model configuration again from the same arguments."""
    topology = Topology.from_args(args)
    ctx = mp.get_context("spawn")
    launched = SchedulerProcesses(endpoints=endpoints, topology=topology)
    for local_rank in range(topology.ranks_per_node):
        rank = topology.global_rank(local_rank)
        proc = ctx.Process(target=_rank_main, args=(args, endpoints, local_rank, rendezvous),
                           name=f"meshserve-rank-{rank}", daemon=True)
        proc.start()
        launched.processes.append(proc)
    return launched


def _rank_main(args: ServerArgs, endpoints: SchedulerEndpoints | None, local_rank: int,
               rendezvous: str | None) -> None:
    """A rank's entry point, importing the scheduler (torch, the model code) in the rank only:
    the parent spawns its ranks before importing any of it, so that their start-up overlaps
    its own (meshserve/runtime.py)."""
    from meshserve.scheduler.process import run_scheduler_process

    run_scheduler_process(args, endpoints, local_rank, rendezvous)
