"""Starts the scheduler processes of this node and watches them."""

from __future__ import annotations

import logging
import multiprocessing as mp
from dataclasses import dataclass, field

from meshserve.cluster.endpoints import SchedulerEndpoints
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs

logger = logging.getLogger("meshserve")


@dataclass
class SchedulerProcesses:
    endpoints: SchedulerEndpoints
    processes: list[mp.process.BaseProcess] = field(default_factory=list)

    def dead(self) -> str | None:
        """A description of the first scheduler process that has exited, or None if all live."""
        for rank, proc in enumerate(self.processes):
            if not proc.is_alive():
                return f"scheduler rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
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


def launch_schedulers(args: ServerArgs, model_config: ModelConfig) -> SchedulerProcesses:
    """One scheduler process per local rank (one, until tensor parallelism lands). `spawn`, not
    `fork`: the parent may already run threads (asyncio, tokenizers) that fork would corrupt."""
    from meshserve.scheduler.process import run_scheduler_process

    del model_config  # every scheduler resolves it again from the same arguments
    endpoints = SchedulerEndpoints.new_ipc()
    ctx = mp.get_context("spawn")
    proc = ctx.Process(target=run_scheduler_process, args=(args, endpoints, 0), name="meshserve-scheduler-0",
                       daemon=True)
    proc.start()
    return SchedulerProcesses(endpoints=endpoints, processes=[proc])
