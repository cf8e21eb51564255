"""Starts this node's scheduler processes (one per local rank) and watches them."""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass, field

from meshserve.cluster.endpoints import SchedulerEndpoints
from meshserve.cluster.topology import Topology
from meshserve.config.server_args import ServerArgs

logger = logging.getLogger("meshserve")


@dataclass
class SchedulerProcesses:
    endpoints: SchedulerEndpoints | None  # None on nodes other than 0: no TokenizerManager there
    topology: Topology
    processes: list[mp.process.BaseProcess] = field(default_factory=list)

    def dead(self) -> str | None:
        """A description of the first scheduler process that has exited, or None if all live."""
        for local_rank, proc in enumerate(self.processes):
            if not proc.is_alive():
                rank = self.topology.global_rank(local_rank)
                return f"scheduler rank {rank} on node {self.topology.node_rank} (pid {proc.pid}) " \
                       f"exited with code {proc.exitcode}"
        return None

    def shutdown(self, timeout: float = 5.0) -> None:
        for proc in self.processes:
            if proc.is_alive():
                proc.terminate()
        for proc in self.processes:
            proc.join(timeout)
            if proc.is_alive():
                logger.warning("scheduler pid %s ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.join(timeout)


def launch_schedulers(args: ServerArgs, rendezvous: str | None) -> SchedulerProcesses:
    """One scheduler process per local rank, joining the world at `rendezvous` (host:port of the
    running rendezvous store; None for a single rank). `spawn`, not `fork`: the parent may
    already run threads (asyncio, tokenizers, the coordinator) that fork would corrupt. Every
    process resolves the model configuration again from the same arguments."""
    from meshserve.scheduler.process import run_scheduler_process

    topology = Topology.from_args(args)
    endpoints = SchedulerEndpoints.new_ipc() if topology.is_leader_node else None
    ctx = mp.get_context("spawn")
    launched = SchedulerProcesses(endpoints=endpoints, topology=topology)
    for local_rank in range(topology.ranks_per_node):
        rank = topology.global_rank(local_rank)
        proc = ctx.Process(target=run_scheduler_process, args=(args, endpoints, local_rank, rendezvous),
                           name=f"meshserve-rank-{rank}", daemon=True)
        proc.start()
        launched.processes.append(proc)
    return launched
