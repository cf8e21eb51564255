"""The cluster's ports, derived from one base port and printed at start-up on every node.

The base port P is the port of ``--dist-init-addr`` (LESSONS.md: races and conflicts come
from ports chosen in many places; a fixed, printed plan is what a firewall rule needs):

  P     torch.distributed rendezvous (the TCPStore; listens on node 0)
  P+1   cluster coordinator: join handshake and heartbeats (listens on node 0)
  P+2   scheduler link: DP group leaders on nodes r > 0 to node 0's main process (listens on
        node 0 when some DP group's leader runs on another node)
  --port                          HTTP on every node (node 0: the API; others: /health, /metrics)
  --disaggregation-bootstrap-port prefill-decode bootstrap, separate from this plan

With one node, more than one rank and no ``--dist-init-addr``, P is picked on loopback such
that P, P+1 and P+2 are free at the time of the check (the launcher binds them soon after;
the window between is the only race left). One rank on one node needs no cluster ports.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshserve.cluster.net import HostPort, NetError

if TYPE_CHECKING:
    from meshserve.config.server_args import ServerArgs

__all__ = ["PortPlan", "PortPlanError", "pick_free_base_port"]

#: Ports above the base port that belong to the plan (P+1 coordinator, P+2 scheduler link).
PORTS_ABOVE_BASE = 2

_PICK_ATTEMPTS = 50


class PortPlanError(ValueError):
    """The ports cannot be planned (conflict, out of range, none free)."""


@dataclass(frozen=True)
class PortPlan:
    nnodes: int
    node_rank: int
    http_host: str
    http_port: int
    #: node 0's rendezvous host and the base port P; None for one rank on one node.
    dist_init: HostPort | None
    #: True when P was picked on loopback rather than given by --dist-init-addr.
    picked: bool = False

    @classmethod
    def from_args(cls, args: ServerArgs) -> PortPlan:
        p = args.parallel
        if p.dist_init_addr is not None:
            try:
                dist_init: HostPort | None = HostPort.parse(p.dist_init_addr)
            except NetError as err:
                raise PortPlanError(str(err)) from err
            picked = False
        elif p.nnodes > 1:
            raise PortPlanError(f"--nnodes {p.nnodes} needs --dist-init-addr HOST:PORT "
                                f"(node 0's address and the base port of the cluster)")
        elif p.tp_size * p.dp_size > 1:
            dist_init, picked = HostPort("127.0.0.1", pick_free_base_port("127.0.0.1")), True
        else:
            dist_init, picked = None, False
        plan = cls(nnodes=p.nnodes, node_rank=p.node_rank, http_host=args.http.host,
                   http_port=args.http.port, dist_init=dist_init, picked=picked)
        plan._check(args)
        return plan

    # ---- the ports -------------------------------------------------------------------------

    @property
    def base(self) -> HostPort:
        if self.dist_init is None:
            raise PortPlanError("one rank on one node: the plan has no cluster ports")
        return self.dist_init

    @property
    def rendezvous_port(self) -> int:
        return self.base.port

    @property
    def coordinator_port(self) -> int:
        return self.base.port + 1

    @property
    def scheduler_link_port(self) -> int:
        return self.base.port + 2

    @property
    def rendezvous_url(self) -> str:
        """``init_method`` for torch.distributed (IPv6 hosts in brackets)."""
        return f"tcp://{self.base}"

    def _check(self, args: ServerArgs) -> None:
        if self.dist_init is None:
            return
        top = self.base.port + PORTS_ABOVE_BASE
        if top > 65535:
            raise PortPlanError(f"--dist-init-addr port {self.base.port}: the plan needs "
                                f"ports {self.base.port}..{top}, beyond 65535")
        cluster = range(self.base.port, top + 1)
        others = {"--port": self.http_port}
        if args.disagg.disaggregation_mode != "null":
            others["--disaggregation-bootstrap-port"] = args.disagg.disaggregation_bootstrap_port
        for flag, port in others.items():
            if port in cluster:
                raise PortPlanError(f"{flag} {port} collides with the cluster ports "
                                    f"{cluster.start}..{cluster.stop - 1} derived from "
                                    f"--dist-init-addr {self.base}; choose another")

    # ---- printing --------------------------------------------------------------------------

    def describe(self) -> str:
        """The plan as a few printable lines (the same on every node except the header)."""
        http = f"{HostPort(self.http_host, self.http_port)}"
        header = f"port plan (node {self.node_rank} of {self.nnodes}"
        if self.dist_init is None:
            return (f"{header}, one rank: no cluster ports)\n"
                    f"  {http:<24} HTTP (--host/--port), this node")
        source = "picked on loopback" if self.picked else "from --dist-init-addr"
        b = self.base
        rows = [
            (HostPort(b.host, self.rendezvous_port), "torch.distributed rendezvous (TCPStore)",
             "node 0"),
            (HostPort(b.host, self.coordinator_port), "cluster coordinator (join, heartbeats)",
             "node 0"),
            (HostPort(b.host, self.scheduler_link_port), "scheduler link (DP leaders on other nodes)",
             "node 0"),
        ]
        lines = [f"{header}, base port {b.port} {source}):"]
        lines += [f"  {addr!s:<24} {what:<42} {where}" for addr, what, where in rows]
        lines.append(f"  {http:<24} {'HTTP (--host/--port)':<42} this node")
        if self.nnodes > 1:
            lines.append("  gloo/NCCL data connections use ephemeral ports between the nodes' "
                         "cluster interfaces")
        return "\n".join(lines)


def pick_free_base_port(host: str) -> int:
    """A port P such that P..P+2 can be bound on ``host`` right now."""
    for _ in range(_PICK_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind((host, 0))
            base = probe.getsockname()[1]
            if base + PORTS_ABOVE_BASE > 65535:
                continue
            if all(_can_bind(host, base + i) for i in range(1, PORTS_ABOVE_BASE + 1)):
                return base
    raise PortPlanError(f"found no {PORTS_ABOVE_BASE + 1} consecutive free ports on {host} "
                        f"after {_PICK_ATTEMPTS} attempts; give --dist-init-addr {host}:PORT")


def _can_bind(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Same option as the real listeners (TCPStore, coordinator): TIME_WAIT is no conflict.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True
