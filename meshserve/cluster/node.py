"""ClusterNode: this node's membership in the cluster, set up before any rank starts.

Order on every node: print the port plan; choose and print the cluster interface (exported for
gloo/NCCL); on node 0, serve the torch.distributed rendezvous store on the cluster address
(never all interfaces); join the coordinator (nnodes > 1: fingerprint handshake, start-up
timeout naming missing nodes, then heartbeats). Only then do the ranks form the process group,
so a mismatched or missing node is reported before anything can hang in NCCL.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from meshserve.cluster.coordinator import ClusterCoordinator
from meshserve.cluster.distributed import RendezvousStore, serve_rendezvous_store
from meshserve.cluster.fingerprint import Fingerprint
from meshserve.cluster.net import ClusterNet, choose_cluster_interface, export_for_torch
from meshserve.cluster.port_plan import PortPlan
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs

logger = logging.getLogger("meshserve")

FailureHandler = Callable[[str, bool], None]  # (reason, clean)


class ClusterNode:
    def __init__(self, args: ServerArgs, model_config: ModelConfig) -> None:
        self.args = args
        self.model_config = model_config
        self.plan = PortPlan.from_args(args)
        self.net: ClusterNet | None = None
        self.coordinator: ClusterCoordinator | None = None
        self._store: RendezvousStore | None = None
        self._handler: FailureHandler = _exit_on_failure
        self._handler_lock = threading.Lock()

    @property
    def node_rank(self) -> int:
        return self.args.parallel.node_rank

    @property
    def rendezvous(self) -> str | None:
        """host:port of the rendezvous store the ranks connect to; None for a single rank."""
        if self.plan.dist_init is None:
            return None
        assert self.net is not None
        host = self.net.dist_init_ip
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self.plan.rendezvous_port}"

    def start(self) -> None:
        """Raises (ClusterError, NetError, PortPlanError, OSError) with a message for the user."""
        logger.info("%s", self.plan.describe())
        if self.plan.dist_init is None:
            return
        timeout = self.args.parallel.startup_timeout
        self.net = choose_cluster_interface(self.plan.base, self.args.parallel.nnodes,
                                            deadline=time.monotonic() + timeout)
        export_for_torch(self.net)
        logger.info("%s", self.net.describe())
        if self.node_rank == 0:
            self._store = serve_rendezvous_store(self.net.address, self.plan.rendezvous_port)
        if self.args.parallel.nnodes > 1:
            address = (self.net.address if self.node_rank == 0 else self.net.dist_init_ip,
                       self.plan.coordinator_port)
            self.coordinator = ClusterCoordinator(
                node_rank=self.node_rank, nnodes=self.args.parallel.nnodes, address=address,
                fingerprint=Fingerprint.from_server_args(self.args, self.model_config),
                startup_timeout=timeout, on_failure=self._on_failure)
            self.coordinator.start()  # logs the membership once whole

    def on_failure(self, handler: FailureHandler) -> None:
        """Who handles a cluster failure from now on (the default logs and exits non-zero)."""
        with self._handler_lock:
            self._handler = handler

    def _on_failure(self, reason: str, clean: bool) -> None:
        with self._handler_lock:
            handler = self._handler
        handler(reason, clean)

    def problem(self) -> str | None:
        """Why this node cannot serve right now (for /health), or None."""
        if self.coordinator is not None and not self.coordinator.is_whole:
            return self.coordinator.failure_reason or "the cluster is not whole"
        return None

    def report_failure(self, reason: str) -> None:
        if self.coordinator is not None:
            self.coordinator.report_failure(reason)

    def shutdown(self, *, clean: bool, reason: str) -> None:
        if self.coordinator is not None:
            self.coordinator.shutdown(clean=clean, reason=reason)


def _exit_on_failure(reason: str, clean: bool) -> None:
    """Before the node's server is up there is nothing to drain: leave at once."""
    (logger.info if clean else logger.error)("cluster %s: %s", "stopped" if clean else "failed", reason)
    os._exit(0 if clean else 1)
