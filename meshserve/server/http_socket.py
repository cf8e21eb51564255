"""The HTTP listening socket, bound first thing at start-up (before torch is imported)."""

from __future__ import annotations

import socket


def bind_http_socket(host: str, port: int) -> socket.socket:
    """Bind the HTTP port before the model loads, so a busy port fails in a second, not after
    minutes of loading (and the port stays ours meanwhile)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0 (socket.create_server's): asyncio sets TCP_NODELAY only on connections
    # accepted from a socket that says it is TCP. Without it, Nagle's algorithm held a stream's
    # first event back until the client's delayed ACK of the response headers (~40 ms): at
    # concurrency 1 about half of the first tokens reached the client ~32 ms late.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock
