"""The torch.distributed rendezvous store, reachable by cluster members only.

torch's TCPStore has no authentication: whoever reaches it can read and overwrite the keys
the ranks exchange while forming the world. So the real store listens on node 0's loopback
only, and the cluster reaches it through authenticated tunnels:

    node 0:   ranks ──> TCPStore 127.0.0.1:<ephemeral>  <── gate on <cluster address>:P
    node r>0: ranks ──> relay 127.0.0.1:<ephemeral> ──(handshake, then bytes)──> gate

The gate and the relay are meshserve.cluster.tunnel's (handshake purpose "rendezvous"): a
stranger is dropped and logged; the TCPStore protocol itself is untouched (torch on both
ends). With one node there is no gate: the store listens on loopback at P.

Trust boundary: processes on the node itself (loopback) are trusted, as they are for the
scheduler's IPC sockets.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field

from meshserve.cluster.auth import HANDSHAKE_TIMEOUT_S, ClusterSecret
from meshserve.cluster.distributed import RendezvousStore, serve_rendezvous_store
from meshserve.cluster.tunnel import LOOPBACK, Forwarder, close_all, listen

__all__ = ["Rendezvous"]

_PURPOSE = b"rendezvous"


@dataclass
class Rendezvous:
    """This node's way to the store: ``address`` ("host:port") is what its ranks connect to."""

    address: str
    store: RendezvousStore | None = None  # node 0 only
    _listeners: list[socket.socket] = field(default_factory=list)

    @classmethod
    def single_node(cls, port: int) -> Rendezvous:
        store = serve_rendezvous_store(LOOPBACK, port)
        return cls(f"{LOOPBACK}:{port}", store)

    @classmethod
    def serve(cls, cluster_address: str, port: int, secret: ClusterSecret) -> Rendezvous:
        """Node 0: the store on loopback, and the authenticating gate on the cluster port P."""
        store = serve_rendezvous_store(LOOPBACK, 0)
        store_port = store.listener.getsockname()[1]

        def open_upstream(conn: socket.socket) -> socket.socket:
            secret.accept(conn, _PURPOSE)
            return socket.create_connection((LOOPBACK, store_port))

        gate = listen(cluster_address, port)
        Forwarder(gate, open_upstream, "rendezvous-gate").start()
        return cls(f"{LOOPBACK}:{store_port}", store, [gate])

    @classmethod
    def relay(cls, node0_address: str, port: int, secret: ClusterSecret) -> Rendezvous:
        """Node r > 0: a loopback relay that authenticates each connection to node 0's gate."""

        def open_upstream(_: socket.socket) -> socket.socket:
            up = socket.create_connection((node0_address, port), timeout=HANDSHAKE_TIMEOUT_S)
            try:
                secret.connect(up, _PURPOSE)
            except BaseException:
                up.close()
                raise
            return up

        relay = listen(LOOPBACK, 0)
        Forwarder(relay, open_upstream, "rendezvous-relay").start()
        return cls(f"{LOOPBACK}:{relay.getsockname()[1]}", None, [relay])

    def close(self) -> None:
        close_all(self._listeners)
        if self.store is not None:
            self.store.close()
