"""The torch.distributed rendezvous store, reachable by cluster members only.

torch's TCPStore has no authentication: whoever reaches it can read and overwrite the keys
the ranks exchange while forming the world. So the real store listens on node 0's loopback
only, and the cluster reaches it through authenticated tunnels:

    node 0:   ranks ──> TCPStore 127.0.0.1:<ephemeral>  <── gate on <cluster address>:P
    node r>0: ranks ──> relay 127.0.0.1:<ephemeral> ──(handshake, then bytes)──> gate

The gate runs the cluster handshake (meshserve.cluster.auth, purpose "rendezvous") on every
connection before it forwards a byte; a stranger is dropped and logged. The relay on node
r > 0 authenticates to the gate for each connection of its ranks, then pipes bytes both ways.
The TCPStore protocol itself is untouched (torch on both ends). With one node there is no
gate: the store listens on loopback at P.

Trust boundary: processes on the node itself (loopback) are trusted, as they are for the
scheduler's IPC sockets.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from meshserve.cluster.auth import HANDSHAKE_ERRORS, HANDSHAKE_TIMEOUT_S, ClusterSecret
from meshserve.cluster.distributed import RendezvousStore, serve_rendezvous_store

__all__ = ["Rendezvous"]

logger = logging.getLogger("meshserve")

LOOPBACK = "127.0.0.1"
_PURPOSE = b"rendezvous"
_CHUNK = 1 << 16


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

        gate = _listen(cluster_address, port)
        _Forwarder(gate, open_upstream, "gate").start()
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

        relay = _listen(LOOPBACK, 0)
        _Forwarder(relay, open_upstream, "relay").start()
        return cls(f"{LOOPBACK}:{relay.getsockname()[1]}", None, [relay])

    def close(self) -> None:
        for listener in self._listeners:
            with contextlib.suppress(OSError):
                listener.close()
        if self.store is not None:
            self.store.close()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


@dataclass
class _Forwarder:
    """Accepts connections; for each, ``open_upstream(conn)`` (authentication happens there;
    any handshake error drops the connection with one log line) and then pipes bytes both
    ways until each side has finished. Daemon threads: they end with the process."""

    listener: socket.socket
    open_upstream: Callable[[socket.socket], socket.socket]
    name: str

    def start(self) -> None:
        _spawn(f"rendezvous-{self.name}", self._accept_loop)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return  # closed
            _spawn(f"rendezvous-{self.name}-conn", self._serve, conn, peer[0])

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            upstream = self.open_upstream(conn)
        except HANDSHAKE_ERRORS as err:
            logger.warning("cluster: rendezvous %s dropped a connection from %s: %s", self.name, peer,
                           str(err) or type(err).__name__)
            conn.close()
            return
        conn.settimeout(None)
        upstream.settimeout(None)
        back = _spawn(f"rendezvous-{self.name}-pipe", _pipe, upstream, conn)
        _pipe(conn, upstream)
        back.join()
        conn.close()
        upstream.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy until src ends, then half-close dst so that its reader sees the end too."""
    try:
        while chunk := src.recv(_CHUNK):
            dst.sendall(chunk)
    except OSError:
        pass
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _spawn(name: str, target: Callable[..., None], *args: object) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True, name=f"meshserve-{name}")
    thread.start()
    return thread
