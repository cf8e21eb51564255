"""How the DP group leaders on nodes r > 0 reach node 0's main process.

The TokenizerManager binds its ZMQ sockets on Unix paths on node 0 (SchedulerEndpoints: one
inbox per DP group, one shared outbox). A leader on node 0 connects to them directly. A leader
on node r > 0 connects to loopback relays on its own node, one per socket it uses; each relay
tunnels every connection to node 0's gate on P+2 (meshserve.cluster.tunnel, handshake purpose
"scheduler-link"), names the socket it wants in one frame (LinkTarget), and from then on pipes
bytes. ZMQ's own stream protocol runs unchanged end to end (tcp on the leader's side, ipc on
the TokenizerManager's), so the messages are the same msgspec msgpack as on one node; nothing
is pickled, and nothing but the authenticated gate listens beyond loopback.

The gate runs on node 0 only when some DP group's leader runs elsewhere (plain TP over nodes,
or DP on one node, needs none). Connections the gate cannot forward yet (the TokenizerManager
binds after the ranks start) are closed quietly: ZMQ reconnects every 100 ms by itself.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

import msgspec

from meshserve.cluster.auth import HANDSHAKE_TIMEOUT_S, ClusterSecret
from meshserve.cluster.endpoints import SchedulerEndpoints
from meshserve.cluster.frames import PeerClosed, ProtocolError, pack_frame, recv_frame
from meshserve.cluster.tunnel import LOOPBACK, Forwarder, UpstreamUnavailable, close_all, listen

__all__ = ["SchedulerLink"]

_PURPOSE = b"scheduler-link"
_MAX_TARGET_FRAME = 64


class LinkTarget(msgspec.Struct, frozen=True):
    """Which of node 0's scheduler sockets a tunnelled connection reaches."""

    inbox: int | None  # that DP group's inbox (to_scheduler); None: the shared outbox (from_scheduler)


_TARGET = msgspec.msgpack.Decoder(LinkTarget)
_ENCODER = msgspec.msgpack.Encoder()


@dataclass
class SchedulerLink:
    """This node's scheduler endpoints and, across nodes, the tunnel ends that serve them."""

    endpoints: SchedulerEndpoints
    _listeners: list[socket.socket] = field(default_factory=list)

    @classmethod
    def serve(cls, endpoints: SchedulerEndpoints, cluster_address: str, port: int,
              secret: ClusterSecret) -> SchedulerLink:
        """Node 0: ``endpoints`` (the TokenizerManager's Unix sockets) and the gate on P+2 that
        forwards authenticated connections to them."""

        def open_upstream(conn: socket.socket) -> socket.socket:
            secret.accept(conn, _PURPOSE)
            try:
                target = _TARGET.decode(recv_frame(conn, _MAX_TARGET_FRAME, _deadline()))
            except msgspec.DecodeError as err:
                raise ProtocolError(f"not a link target ({err})") from err
            path = _unix_path(_address(endpoints, target))
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(path)
            except OSError as err:
                upstream.close()
                raise UpstreamUnavailable(f"{path}: {err}") from err
            return upstream

        gate = listen(cluster_address, port)
        Forwarder(gate, open_upstream, "scheduler-link-gate").start()
        return cls(endpoints, [gate])

    @classmethod
    def relay(cls, node0_address: str, port: int, secret: ClusterSecret, dp_ranks: list[int],
              dp_size: int) -> SchedulerLink:
        """Node r > 0 leading the DP groups ``dp_ranks``: loopback relays to their inboxes
        and to the shared outbox, through node 0's gate."""
        listeners: list[socket.socket] = []

        def relay_to(target: LinkTarget) -> str:
            def open_upstream(_: socket.socket) -> socket.socket:
                try:
                    up = socket.create_connection((node0_address, port), timeout=HANDSHAKE_TIMEOUT_S)
                except OSError as err:
                    raise UpstreamUnavailable(f"node 0's scheduler link {node0_address}:{port}: {err}") from err
                try:
                    secret.connect(up, _PURPOSE)
                    up.sendall(pack_frame(_ENCODER.encode(target)))
                except (PeerClosed, ConnectionError) as err:
                    up.close()  # node 0 going away (its shutdown): ZMQ retries until this node stops
                    raise UpstreamUnavailable(f"node 0's scheduler link closed: {err}") from err
                except BaseException:
                    up.close()
                    raise
                return up

            listener = listen(LOOPBACK, 0)
            listeners.append(listener)
            Forwarder(listener, open_upstream, "scheduler-link-relay").start()
            return f"tcp://{LOOPBACK}:{listener.getsockname()[1]}"

        inboxes = tuple(relay_to(LinkTarget(d)) if d in dp_ranks else None for d in range(dp_size))
        return cls(SchedulerEndpoints(to_scheduler=inboxes, from_scheduler=relay_to(LinkTarget(None))),
                   listeners)

    def close(self) -> None:
        close_all(self._listeners)


def _address(endpoints: SchedulerEndpoints, target: LinkTarget) -> str:
    if target.inbox is None:
        return endpoints.from_scheduler
    if not 0 <= target.inbox < len(endpoints.to_scheduler):
        raise ProtocolError(f"no DP group {target.inbox}")
    return endpoints.inbox(target.inbox)


def _unix_path(address: str) -> str:
    assert address.startswith("ipc://"), address  # node 0's endpoints are SchedulerEndpoints.new_ipc's
    return address.removeprefix("ipc://")


def _deadline() -> float:
    return time.monotonic() + HANDSHAKE_TIMEOUT_S
