"""Bounds on what one HTTP client can hold: time and bytes for a request's headers and body.

A client that sends headers and half a body, a chunked body that never ends, or headers that
never end would otherwise hold its connection (and a task) forever (issue 10, item 5).

Invariants:
* Headers: complete within `header_timeout` of the connection opening (or of the previous
  response), else the connection is closed; larger than MAX_HEADER_BYTES, a 400. Enforced in
  the h11 protocol (BoundedH11Protocol), since no ASGI app runs before the headers are in.
* Body: complete within `body_timeout` of the headers, else a 408; more than `max_body_size`
  bytes (declared or sent), a 413; Transfer-Encoding together with Content-Length (a request
  smuggling pattern, RFC 9112 §6.3), a 400. Enforced by BodyLimitMiddleware, which reads the
  whole body before the app sees the request, so handlers never wait on a client.
* Every such answer is an OpenAI-style JSON error with `Connection: close`; where h11 cannot
  parse the request at all, the 400 is JSON too.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import h11
import msgspec
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from meshserve.server.api_wire import APIError
from meshserve.server.http_probes import H2ProbeTolerantProtocol

# h11 buffers an incomplete request line + headers up to this size, then refuses (a 400).
MAX_HEADER_BYTES = 64 * 1024


@dataclass(frozen=True)
class HttpLimits:
    header_timeout: float
    body_timeout: float
    max_body_size: int


def _error_bytes(err: APIError) -> bytes:
    return msgspec.json.encode(err.body())


def _error_headers(body: bytes) -> list[tuple[bytes, bytes]]:
    return [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]


async def _send_error(send: Send, err: APIError) -> None:
    body = _error_bytes(err)
    await send({"type": "http.response.start", "status": err.status, "headers": _error_headers(body)})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """Reads each request's whole body within the limits, then hands the app a receive() that
    replays it (and afterwards reports the client's disconnect, as the server's would)."""

    def __init__(self, app: ASGIApp, limits: HttpLimits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        problem = self._header_problem(headers)
        if problem is not None:
            await _send_error(send, problem)
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.limits.body_timeout)
        except TimeoutError:
            await _send_error(send, APIError(
                408, f"the request body did not arrive within {self.limits.body_timeout:g} s",
                code="request_timeout"))
            return
        except _BodyTooLarge:
            await _send_error(send, self._too_large())
            return
        if body is None:  # the client left before sending its body: nobody to answer
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _header_problem(self, headers: dict[bytes, bytes]) -> APIError | None:
        if b"transfer-encoding" in headers and b"content-length" in headers:
            return APIError(400, "a request must not carry both Transfer-Encoding and Content-Length")
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_size:
            return self._too_large()
        return None

    def _too_large(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.limits.max_body_size} bytes",
                            code="request_too_large")

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, or None if the client disconnected first."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_size:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _BodyTooLarge(Exception):
    pass


class BoundedH11Protocol(H2ProbeTolerantProtocol):
    """uvicorn's h11 protocol (as the probe-tolerant one), plus a deadline for each request's headers and a JSON body on
    the 400 for a request h11 cannot parse. `header_timeout` is set by `bounded_protocol`."""

    header_timeout: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._header_bytes = 0  # bytes of the current request's headers received so far

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            # h11's own bound (max_incomplete_event_size) only applies while the headers are
            # incomplete in its buffer; headers that arrive whole in one read pass it. Count
            # them here, up to the blank line that ends them.
            end = data.find(b"\r\n\r\n")
            self._header_bytes += len(data) if end < 0 else end + 4
            if self._header_bytes > MAX_HEADER_BYTES:
                self.send_400_response(f"headers larger than {MAX_HEADER_BYTES} bytes")
                return
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # this request's headers are complete
            self._header_bytes = 0
            self._disarm_header_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # waiting for the next request's headers
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        # Written as bytes, not through h11: h11 refuses a response before a request was parsed.
        body = _error_bytes(APIError(400, f"malformed HTTP request: {msg}"))
        head = b"".join(name + b": " + value + b"\r\n" for name, value in _error_headers(body))
        self.transport.write(b"HTTP/1.1 400 Bad Request\r\n" + head + b"\r\n" + body)
        self.transport.close()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_deadline_passed)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_deadline_passed(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def bounded_protocol(header_timeout: float) -> type[BoundedH11Protocol]:
    """The protocol class uvicorn instantiates per connection, with this header deadline."""
    return type("BoundedH11Protocol", (BoundedH11Protocol,), {"header_timeout": header_timeout})
