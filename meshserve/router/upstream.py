"""Upstream: one attempt of a request on one worker, and passing its answer to the client.

Invariants:
* A failure is *retryable* (AttemptFailed) only while nothing has reached the client: no
  answer (connect error, timeout), a 5xx, or a body cut before its first byte was relayed.
  Every such failure is counted against the worker's breaker; any answer below 500 counts as
  a success (a 4xx is the client's problem, passed on as is).
* A stream that already started is never retried: if the worker fails mid-stream the client
  gets an error event and `data: [DONE]`.
* Every Exchange is closed exactly once — after its body is read, when its relay ends, or when
  the attempt is cancelled (client gone); closing the upstream connection is what makes a
  meshserve server abort the request.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import msgspec
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from meshserve.router.metrics import RouterMetrics
from meshserve.router.pool import WorkerPool
from meshserve.router.worker import Worker
from meshserve.server.api_wire import SSE_DONE, APIError, sse

log = logging.getLogger(__name__)

class AttemptFailed(Exception):
    """The worker failed before anything reached the client; another worker may be tried."""

    def __init__(self, worker: Worker, reason: str, detail: str) -> None:
        super().__init__(f"{worker.url}: {detail}")
        self.worker = worker
        self.reason = reason


def error_response(status: int, message: str, code: str | None = None) -> Response:
    body = APIError(status, message, code=code).body()
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


@dataclass
class Exchange:
    """One request on one worker, headers received, body not yet read."""

    worker: Worker
    response: httpx.Response
    closed: bool = False

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.worker.in_flight -= 1
            await self.response.aclose()


class Upstream:
    def __init__(self, client: httpx.AsyncClient, pool: WorkerPool, metrics: RouterMetrics,
                 api_key: str | None) -> None:
        self.client = client
        self.pool = pool
        self.metrics = metrics
        self._api_key = api_key

    def headers(self, request: Request) -> dict[str, str]:
        """The router's key when it has one (the workers share it), else the client's own
        Authorization, so a key the router does not check still reaches the workers."""
        # identity: bytes are relayed as they come, without their Content-Encoding.
        headers = {"content-type": request.headers.get("content-type", "application/json"),
                   "accept-encoding": "identity"}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        elif "authorization" in request.headers:
            headers["authorization"] = request.headers["authorization"]
        return headers

    def _failed(self, worker: Worker, reason: str, detail: str) -> AttemptFailed:
        self.metrics.error(worker.url, reason)
        self.pool.record_request(worker, ok=False, why=detail)
        log.warning("request to %s failed (%s): %s", worker.url, reason, detail)
        return AttemptFailed(worker, reason, detail)

    async def start(self, worker: Worker, method: str, path: str, content: bytes,
                    headers: dict[str, str]) -> Exchange:
        """Send the request; the exchange once the worker's status and headers are in."""
        self.metrics.sent(worker.url, path)
        worker.in_flight += 1
        request = self.client.build_request(method, worker.url + path, content=content, headers=headers)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as err:
            worker.in_flight -= 1
            raise self._failed(worker, "no_answer", f"{type(err).__name__}: {err}") from err
        except BaseException:
            worker.in_flight -= 1
            raise
        exchange = Exchange(worker, response)
        if response.status_code >= 500:
            detail = f"status {response.status_code}: {(await _read_quietly(response))[:200]!r}"
            await exchange.close()
            raise self._failed(worker, "server_error", detail)
        return exchange

    async def read(self, exchange: Exchange) -> bytes:
        """The whole body; the exchange is closed after."""
        try:
            content = await exchange.response.aread()
        except httpx.HTTPError as err:
            raise self._failed(exchange.worker, "interrupted", f"{type(err).__name__}: {err}") from err
        finally:
            await exchange.close()
        self.pool.record_request(exchange.worker, ok=True)
        return content

    async def first_chunk(self, exchange: Exchange) -> tuple[bytes, AsyncIterator[bytes]]:
        """The stream's first bytes (b"" for an empty body) and the iterator of the rest; the
        exchange is closed on failure, left open otherwise (the relay closes it)."""
        chunks = exchange.response.aiter_raw()
        try:
            first = await anext(chunks, b"")
        except httpx.HTTPError as err:
            await exchange.close()
            raise self._failed(exchange.worker, "interrupted", f"{type(err).__name__}: {err}") from err
        except BaseException:
            await exchange.close()
            raise
        self.pool.record_request(exchange.worker, ok=True)
        return first, chunks

    async def relay(self, exchange: Exchange, first: bytes, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """The stream's bytes as they arrive. A client disconnect cancels this generator
        (Starlette), which closes the upstream connection."""
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        except httpx.HTTPError as err:
            self._failed(exchange.worker, "interrupted", f"mid-stream: {type(err).__name__}: {err}")
            message = f"the worker {exchange.worker.url} failed mid-stream: {type(err).__name__}"
            yield sse(APIError(502, message, code="worker_failed").body())
            yield SSE_DONE
        finally:
            await exchange.close()

    def stream_response(self, exchange: Exchange, first: bytes, chunks: AsyncIterator[bytes]) -> RelayedStream:
        return RelayedStream(exchange, self.relay(exchange, first, chunks))


class RelayedStream(StreamingResponse):
    """A worker's stream on its way to the client; `discard()` closes it when the answer will
    not be sent after all (its relay never started, so the relay cannot close it)."""

    def __init__(self, exchange: Exchange, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, status_code=exchange.response.status_code,
                         media_type=exchange.response.headers.get("content-type"),
                         headers={"Cache-Control": "no-cache"})
        self.exchange = exchange

    async def discard(self) -> None:
        await self.exchange.close()


def passthrough(exchange: Exchange, content: bytes) -> Response:
    return Response(content, status_code=exchange.response.status_code,
                    media_type=exchange.response.headers.get("content-type"))


async def _read_quietly(response: httpx.Response) -> bytes:
    """A failed answer's body, for the log only: an error reading it is no news."""
    try:
        return await response.aread()
    except httpx.HTTPError:
        return b""
