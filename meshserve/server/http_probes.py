"""Probes are answered, not logged at info: health polls and the HTTP/2 preface of gRPC detection.

Load balancers, Kubernetes and our own router poll ``/health`` every few seconds; an access log
line per poll buries everything else in the log, so probe lines are kept for ``--log-level
debug`` only. sglang-router finds out whether a worker speaks gRPC by sending the HTTP/2
connection preface (``PRI * HTTP/2.0``); uvicorn's HTTP/1.1 parser would log that as a warning
("Invalid HTTP request received.") although nothing is wrong.
"""

from __future__ import annotations

import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("meshserve")

# Paths polled by orchestrators and routers (GET, no side effects).
PROBE_PATHS = frozenset({"/health", "/health_generate", "/metrics"})

# The start of the HTTP/2 client connection preface (RFC 9113 §3.4).
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n"


class ProbeAccessFilter(logging.Filter):
    """Drops uvicorn access lines of probe paths unless the logger shows debug records."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn.access records carry (client, method, path with query, http version, status).
        args = record.args if isinstance(record.args, tuple) else ()
        if len(args) >= 3 and str(args[2]).split("?", 1)[0] in PROBE_PATHS:
            return logging.getLogger("uvicorn.access").isEnabledFor(logging.DEBUG)
        return True


def quiet_probe_access_logs() -> None:
    """Install :class:`ProbeAccessFilter` on uvicorn's access logger (once per process)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, ProbeAccessFilter) for f in access.filters):
        access.addFilter(ProbeAccessFilter())


class H2ProbeTolerantProtocol(H11Protocol):
    """uvicorn's h11 protocol, answering an HTTP/2 preface with a plain 400 and a debug line."""

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE and data.startswith(HTTP2_PREFACE):
            log.debug("HTTP/2 preface from %s (a gRPC probe?): answered 400, this server speaks HTTP/1.1",
                      self.client)
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()
            return
        super().data_received(data)
