"""BootstrapServer: where prefill ranks register and decode ranks find them (SGLang's bootstrap
service, at --disaggregation-bootstrap-port on the prefill server's node 0).

Plain HTTP with JSON bodies, so it can be read with curl:
  PUT /register                    a Registration (one per prefill rank; a restarted rank replaces its entry)
  GET /route?tp_rank=N&dp_rank=D   rank N of DP group D's (dp_rank defaults to 0), or 404 while it
                                   has not registered
  GET /health            200
It runs on threads in the launch_server process and binds only the server's --host.
"""

from __future__ import annotations

import logging
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import msgspec

from meshserve.disagg.protocol import Registration

logger = logging.getLogger("meshserve")

MAX_BODY_BYTES = 1 << 20  # a registration carries a backend blob of a few KB


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


class BootstrapServer:
    def __init__(self, host: str, port: int) -> None:
        self._registrations: dict[tuple[int, int], bytes] = {}  # (dp rank, tp rank) -> Registration as JSON
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlsplit(self.path)
                if url.path == "/health":
                    self._reply(HTTPStatus.OK, b"{}")
                elif url.path == "/route":
                    query = parse_qs(url.query)
                    rank, group = query.get("tp_rank", ["0"])[0], query.get("dp_rank", ["0"])[0]
                    found = server.lookup(int(group), int(rank)) if rank.isdigit() and group.isdigit() else None
                    if found is None:
                        where = f"prefill tp rank {rank}" + (f" of DP group {group}" if group != "0" else "")
                        self._reply(HTTPStatus.NOT_FOUND, msgspec.json.encode(
                            {"error": f"{where} has not registered"}))
                    else:
                        self._reply(HTTPStatus.OK, found)
                else:
                    self._reply(HTTPStatus.NOT_FOUND, b'{"error": "no such route"}')

            def do_PUT(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                if urlsplit(self.path).path != "/register" or not 0 < length <= MAX_BODY_BYTES:
                    self._reply(HTTPStatus.BAD_REQUEST, b'{"error": "PUT /register with a Registration body"}')
                    return
                try:
                    reg = msgspec.json.decode(self.rfile.read(length), type=Registration)
                except msgspec.DecodeError as exc:
                    self._reply(HTTPStatus.BAD_REQUEST, msgspec.json.encode({"error": str(exc)}))
                    return
                server.register(reg)
                self._reply(HTTPStatus.OK, b"{}")

            def _reply(self, status: HTTPStatus, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: object) -> None:
                logger.debug("bootstrap server: " + fmt, *args)

        server_cls = _Server6 if ":" in host else _Server
        try:  # binds now: a busy port fails start-up, by name
            self._http = server_cls((host, port), Handler)
        except OSError as exc:
            raise OSError(f"cannot bind the PD bootstrap server to {host}:{port} "
                          f"(--disaggregation-bootstrap-port): {exc}") from exc
        self._thread = threading.Thread(target=self._http.serve_forever, name="meshserve-bootstrap", daemon=True)

    def start(self) -> None:
        self._thread.start()
        host, port = self._http.server_address[:2]
        logger.info("PD bootstrap server on %s:%d", host, port)

    def register(self, reg: Registration) -> None:
        with self._lock:
            self._registrations[reg.dp_rank, reg.tp_rank] = msgspec.json.encode(reg)
        logger.info("PD bootstrap: prefill tp rank %d of DP group %d registered at %s", reg.tp_rank, reg.dp_rank,
                    reg.endpoint)

    def lookup(self, dp_rank: int, tp_rank: int) -> bytes | None:
        with self._lock:
            return self._registrations.get((dp_rank, tp_rank))

    def close(self) -> None:
        if self._thread.is_alive():
            self._http.shutdown()
        self._http.server_close()
