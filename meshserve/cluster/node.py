"""ClusterNode: this node's membership in the cluster, set up before any rank starts.

Order on every node: print the port plan; choose and print the cluster interface (exported for
gloo/NCCL); resolve the cluster secret (nnodes > 1); open this node's way to the rendezvous
store (node 0: the store on loopback and the authenticating gate on P; node r > 0: a loopback
relay to that gate; one node: the store on loopback); join the coordinator (nnodes > 1:
handshake, fingerprint, start-up timeout naming missing nodes, then heartbeats). Only then do
the ranks form the process group, so a mismatched or missing node is reported before anything
can hang in NCCL.

Every failure — a local rank's end (:meth:`watch_ranks`), a rank's error reported by the
server, another node's failure — goes through :meth:`report_failure` to the coordinator, which
picks the one reason every node exits with; the handler set by :meth:`on_failure` gets it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from meshserve.cluster.auth import ClusterSecret, SecretError
from meshserve.cluster.coordinator import ClusterCoordinator, ClusterError
from meshserve.cluster.endpoints import SchedulerEndpoints
from meshserve.cluster.fingerprint import Fingerprint
from meshserve.cluster.launcher import SchedulerProcesses
from meshserve.cluster.net import ClusterNet, choose_cluster_interface, export_for_torch
from meshserve.cluster.port_plan import PortPlan
from meshserve.cluster.scheduler_link import SchedulerLink
from meshserve.cluster.topology import Topology
from meshserve.config.server_args import ServerArgs

if TYPE_CHECKING:  # both import torch, which a node may not need before its ranks start
    from meshserve.cluster.rendezvous import Rendezvous
    from meshserve.config.model_config import ModelConfig

logger = logging.getLogger("meshserve")

FailureHandler = Callable[[str, bool], None]  # (reason, clean)


class ClusterNode:
    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        self.plan = PortPlan.from_args(args)
        self.net: ClusterNet | None = None
        self.coordinator: ClusterCoordinator | None = None
        self._rendezvous: Rendezvous | None = None
        self._secret: ClusterSecret | None = None  # nnodes > 1
        self._link: SchedulerLink | None = None
        self._handler: FailureHandler = _exit_on_failure
        self._handler_lock = threading.Lock()
        self._failed = threading.Event()  # one node: the handler runs once

    @property
    def node_rank(self) -> int:
        return self.args.parallel.node_rank

    @property
    def rendezvous(self) -> str | None:
        """host:port of the rendezvous store the ranks connect to; None for a single rank."""
        return self._rendezvous.address if self._rendezvous is not None else None

    def start(self, model_config: ModelConfig | None) -> None:
        """Raises (ClusterError, NetError, PortPlanError, OSError) with a message for the user.
        `model_config`: needed with nnodes > 1, where the handshake compares it across nodes."""
        logger.info("%s", self.plan.describe())
        if self.plan.dist_init is None:
            return
        from meshserve.cluster.rendezvous import Rendezvous

        p = self.args.parallel
        self.net = choose_cluster_interface(self.plan.base, p.nnodes,
                                            deadline=time.monotonic() + p.startup_timeout)
        export_for_torch(self.net)
        logger.info("%s", self.net.describe())
        if p.nnodes == 1:
            self._rendezvous = Rendezvous.single_node(self.plan.rendezvous_port)
            return
        try:
            secret = ClusterSecret.resolve(flag=p.cluster_secret, file=p.cluster_secret_file,
                                           node_rank=self.node_rank)
        except SecretError as err:
            raise ClusterError(str(err)) from err
        self._secret = secret
        assert model_config is not None, "nnodes > 1: the handshake compares the model's config"
        if secret.generated:
            logger.warning("cluster secret: none given, node 0 generated one; start every other "
                           "node with %s", secret.start_line())
        else:
            logger.info("cluster secret: from %s", secret.source)
        if self.node_rank == 0:
            self._rendezvous = Rendezvous.serve(self.net.address, self.plan.rendezvous_port, secret)
            address = (self.net.address, self.plan.coordinator_port)
        else:
            self._rendezvous = Rendezvous.relay(self.net.dist_init_ip, self.plan.rendezvous_port, secret)
            address = (self.net.dist_init_ip, self.plan.coordinator_port)
        self.coordinator = ClusterCoordinator(
            node_rank=self.node_rank, nnodes=p.nnodes, address=address,
            fingerprint=Fingerprint.from_server_args(self.args, model_config), secret=secret,
            startup_timeout=p.startup_timeout, silence_timeout=p.cluster_silence_timeout,
            on_failure=self._on_failure)
        self.coordinator.start()  # logs the membership once whole

    def scheduler_endpoints(self, topology: Topology) -> SchedulerEndpoints | None:
        """Where this node's DP group leaders reach the main process (None: it runs none).
        Node 0: fresh Unix sockets, and the scheduler-link gate when some leader runs on
        another node; node r > 0: relays to that gate for the groups it leads. Call after
        :meth:`start`, before the ranks start."""
        layout = topology.layout
        led_here = [layout.dp_rank(r) for r in layout.dp_leaders if r in topology.local_ranks]
        if topology.is_leader_node:
            endpoints = SchedulerEndpoints.new_ipc(layout.dp)
            if len(led_here) == layout.dp:
                return endpoints
            assert self.net is not None and self._secret is not None  # leaders elsewhere: nnodes > 1
            self._link = SchedulerLink.serve(endpoints, self.net.address, self.plan.scheduler_link_port,
                                             self._secret)
            logger.info("scheduler link: DP group leaders on other nodes reach this node at %s:%d",
                        self.net.address, self.plan.scheduler_link_port)
            return endpoints
        if not led_here:
            return None
        assert self.net is not None and self._secret is not None
        self._link = SchedulerLink.relay(self.net.dist_init_ip, self.plan.scheduler_link_port, self._secret,
                                         led_here, layout.dp)
        logger.info("scheduler link: DP group(s) %s reach node 0 at %s:%d", ", ".join(map(str, led_here)),
                    self.net.dist_init_ip, self.plan.scheduler_link_port)
        return self._link.endpoints

    def on_failure(self, handler: FailureHandler) -> None:
        """Who handles a cluster failure from now on (the default logs and exits non-zero)."""
        with self._handler_lock:
            self._handler = handler

    def _on_failure(self, reason: str, clean: bool) -> None:
        with self._handler_lock:
            handler = self._handler
        handler(reason, clean)

    def watch_ranks(self, processes: SchedulerProcesses) -> None:
        """Report this node's first rank to end (before shutdown), the moment it ends."""
        processes.watch(lambda end: self.report_failure(end.describe(), decisive=end.decisive))

    def problem(self) -> str | None:
        """Why this node cannot serve right now (for /health), or None."""
        if self.coordinator is not None and not self.coordinator.is_whole:
            return self.coordinator.failure_reason or "the cluster is not whole"
        return None

    def report_failure(self, reason: str, *, decisive: bool = False) -> None:
        """A local failure. ``decisive``: a cause (a rank killed), not possibly a consequence
        of another failure (a rank's collective error). The failure handler runs with the
        reason the cluster settles on (at once on a single node)."""
        if self.coordinator is not None:
            self.coordinator.report_failure(reason, decisive=decisive)
        elif not self._failed.is_set():
            self._failed.set()
            self._on_failure(reason, False)

    def shutdown(self, *, clean: bool, reason: str) -> None:
        if self.coordinator is not None:
            self.coordinator.shutdown(clean=clean, reason=reason)
        if self._rendezvous is not None:
            self._rendezvous.close()
        if self._link is not None:
            self._link.close()


def _exit_on_failure(reason: str, clean: bool) -> None:
    """Before the node's server is up there is nothing to drain: leave at once."""
    (logger.info if clean else logger.error)("cluster %s: %s", "stopped" if clean else "failed", reason)
    os._exit(0 if clean else 1)
