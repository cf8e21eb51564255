"""Authenticated byte tunnels into node 0: the one mechanism by which a cluster service that
listens on node 0's loopback (or a Unix socket) is reached from the other nodes.

    node r>0: client ──> relay 127.0.0.1:<ephemeral> ──(handshake, then bytes)──> gate on node 0
    node 0:   gate <cluster address>:port ──(handshake checked)──> the service, locally

The gate runs the cluster handshake (meshserve.cluster.auth) with the service's purpose on every
connection before it forwards a byte; a stranger is dropped with one log line. The relay
authenticates to the gate for each connection its local clients open, then pipes bytes both
ways. The protocol inside the tunnel (torch's TCPStore, ZMQ) is untouched: both of its ends are
the real thing. Users: meshserve.cluster.rendezvous, meshserve.cluster.scheduler_link.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

from meshserve.cluster.auth import HANDSHAKE_ERRORS

__all__ = ["LOOPBACK", "Forwarder", "UpstreamUnavailable", "close_all", "listen"]

logger = logging.getLogger("meshserve")

LOOPBACK = "127.0.0.1"
_CHUNK = 1 << 16


class UpstreamUnavailable(OSError):
    """The tunnel's far end cannot be reached yet (not listening yet, or node 0 not up): the
    client retries by itself, so this is no stranger and no warning."""


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


@dataclass
class Forwarder:
    """Accepts connections on ``listener``; for each, ``open_upstream(conn)`` (authentication
    happens there; any handshake error drops the connection with one log line) and then pipes
    bytes both ways until each side has finished. Daemon threads: they end with the process.
    ``name`` says which tunnel end this is in thread names and log lines."""

    listener: socket.socket
    open_upstream: Callable[[socket.socket], socket.socket]
    name: str

    def start(self) -> None:
        _spawn(self.name, self._accept_loop)

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, peer = self.listener.accept()
            except OSError:
                return  # closed
            _spawn(f"{self.name}-conn", self._serve, conn, str(peer[0]) if peer else "a local process")

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            upstream = self.open_upstream(conn)
        except UpstreamUnavailable as err:
            logger.debug("cluster: %s closed a connection: %s", self.name, err)
            conn.close()
            return
        except HANDSHAKE_ERRORS as err:
            logger.warning("cluster: %s dropped a connection from %s: %s", self.name, peer,
                           str(err) or type(err).__name__)
            conn.close()
            return
        conn.settimeout(None)
        upstream.settimeout(None)
        for end in (conn, upstream):
            _send_at_once(end)
        back = _spawn(f"{self.name}-pipe", _pipe, upstream, conn)
        _pipe(conn, upstream)
        back.join()
        conn.close()
        upstream.close()


def close_all(listeners: list[socket.socket]) -> None:
    for listener in listeners:
        with contextlib.suppress(OSError):
            listener.close()


def _send_at_once(sock: socket.socket) -> None:
    """TCP_NODELAY on a TCP end: the relay forwards each read as it comes, and with Nagle's
    algorithm a small message behind an unacknowledged one waited for the peer's delayed ACK
    (~40 ms) — per scheduler message, across nodes. Unix sockets have no such delay."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


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
