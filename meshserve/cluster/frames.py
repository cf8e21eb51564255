"""Length-prefixed frames on a TCP stream: a 4-byte big-endian length, then the payload.

Shared by the coordinator and the cluster handshake. Every read is bounded twice: by a
maximum frame size (a garbage length is refused before anything is allocated) and,
optionally, by a deadline for the whole frame (a peer that drips one byte at a time cannot
hold the reader longer than that).
"""

from __future__ import annotations

import socket
import struct
import time

__all__ = ["PeerClosed", "ProtocolError", "pack_frame", "recv_frame"]

_LENGTH = struct.Struct("!I")


class PeerClosed(Exception):
    """The peer closed (or reset) the connection."""

    def __str__(self) -> str:
        return "connection closed"


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


def pack_frame(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload)) + payload


def recv_frame(sock: socket.socket, max_bytes: int, deadline: float | None = None) -> bytes:
    """One frame's payload. Raises PeerClosed, ProtocolError (oversized), or TimeoutError
    (the socket's own timeout between bytes, or ``deadline``, a time.monotonic() value)."""
    (length,) = _LENGTH.unpack(_recv_exact(sock, _LENGTH.size, deadline))
    if length > max_bytes:
        raise ProtocolError(f"frame of {length} bytes exceeds {max_bytes}")
    return _recv_exact(sock, length, deadline)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(remaining)
        try:
            chunk = sock.recv(n - len(buf))
        except (ConnectionResetError, BrokenPipeError) as err:
            raise PeerClosed() from err
        if not chunk:
            raise PeerClosed()
        buf += chunk
    return bytes(buf)
