"""PDProxy: a request goes to a (prefill, decode) pair at once, with the bootstrap fields; the
client gets the decode server's answer, the prefill's is drained and discarded.

Invariants:
* Both servers get the same body (same room), sent concurrently: the decode server waits for
  the prefill's KV, so sending one after the other could deadlock on a busy prefill.
* If the prefill fails before the decode has answered (its first byte, or its whole body when
  not streaming), the decode request is cancelled (its connection closed, so it aborts), and
  the client gets the prefill's error — a 4xx as is; a connect error or 5xx is retried on a
  new pair (new room) while attempts remain. A decode failure cancels the prefill likewise.
* Once the decode has answered, the prefill's answer is drained in the background; its error,
  if any, is only logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable

import msgspec
from fastapi import Request
from fastapi.responses import Response

from meshserve.router.bootstrap import with_bootstrap
from meshserve.router.proxy import CLIENT_GONE_STATUS
from meshserve.router.request_body import RequestBody
from meshserve.router.upstream import (AttemptFailed, RelayedStream, Upstream, error_response,
                                       passthrough)
from meshserve.router.worker import Role, Worker
from meshserve.server.disconnect import ClientGone, until_disconnect

log = logging.getLogger(__name__)


class PDProxy:
    def __init__(self, upstream: Upstream, max_retries: int, rng: random.Random | None = None) -> None:
        self.upstream = upstream
        self.max_retries = max_retries
        self._rng = rng or random.Random()
        self._draining: set[asyncio.Task[None]] = set()

    async def forward(self, request: Request, path: str) -> Response:
        body = RequestBody.parse(await request.body())
        if body.json is None:
            return error_response(400, "the body must be a JSON object")
        headers = self.upstream.headers(request)
        pool = self.upstream.pool
        tried: list[str] = []
        failure = "no healthy prefill and decode pair"
        attempts = 0
        for attempt in range(self.max_retries + 1):
            prefill = pool.pick(Role.PREFILL, body.text, tried)
            decode = pool.pick(Role.DECODE, body.text, tried)
            if prefill is None or decode is None:
                break
            if attempt:
                self.upstream.metrics.retried()
            attempts += 1
            content = msgspec.json.encode(with_bootstrap(body.json, prefill.host, prefill.bootstrap_port, self._rng))
            try:
                return await until_disconnect(
                    request, self._attempt(prefill, decode, request.method, path, content, body.stream, headers))
            except AttemptFailed as err:
                tried.append(err.worker.url)
                failure = str(err)
            except ClientGone:
                return Response(status_code=CLIENT_GONE_STATUS)
        return error_response(503, f"no prefill/decode pair could serve the request after {attempts} attempt(s): "
                              f"{failure}", code="service_unavailable")

    async def _prefill(self, worker: Worker, method: str, path: str, content: bytes,
                       headers: dict[str, str]) -> Response:
        exchange = await self.upstream.start(worker, method, path, content, headers)
        return passthrough(exchange, await self.upstream.read(exchange))

    async def _decode(self, worker: Worker, method: str, path: str, content: bytes, stream: bool,
                      headers: dict[str, str]) -> Response:
        exchange = await self.upstream.start(worker, method, path, content, headers)
        if stream and exchange.response.status_code == 200:
            first, chunks = await self.upstream.first_chunk(exchange)
            return self.upstream.stream_response(exchange, first, chunks)
        return passthrough(exchange, await self.upstream.read(exchange))

    async def _attempt(self, prefill: Worker, decode: Worker, method: str, path: str, content: bytes,
                       stream: bool, headers: dict[str, str]) -> Response:
        prefill_task = asyncio.ensure_future(self._prefill(prefill, method, path, content, headers))
        decode_task = asyncio.ensure_future(self._decode(decode, method, path, content, stream, headers))
        try:
            await asyncio.wait({prefill_task, decode_task}, return_when=asyncio.FIRST_COMPLETED)
            if not decode_task.done():
                prefill_answer = await _settled(prefill_task)
                if isinstance(prefill_answer, Exception) or prefill_answer.status_code >= 400:
                    await _cancel(decode_task)
                    return _raise_or_return(prefill_answer, f"prefill {prefill.url}")
            answer = await decode_task
        except BaseException:
            await _cancel(prefill_task)
            await _cancel(decode_task)
            raise
        if answer.status_code >= 400:
            await _cancel(prefill_task)
        else:
            self._drain(prefill_task, prefill.url)
        return answer

    def _drain(self, task: asyncio.Task[Response], url: str) -> None:
        async def drain() -> None:
            outcome = await _settled(task)
            if isinstance(outcome, Exception):
                log.error("prefill %s failed after its decode answered: %s", url, outcome)
            elif outcome.status_code >= 400:
                log.error("prefill %s answered %d after its decode answered: %r", url, outcome.status_code,
                          bytes(outcome.body)[:300])

        drainer = asyncio.ensure_future(drain())
        self._draining.add(drainer)
        drainer.add_done_callback(self._draining.discard)


async def _settled(task: Awaitable[Response]) -> Response | Exception:
    try:
        return await task
    except Exception as err:  # noqa: BLE001 - the caller decides what a failure means
        return err


async def _cancel(task: asyncio.Task[Response]) -> None:
    """Stop one side: cancelled if still running, its stream closed if it already had one."""
    if not task.done():
        task.cancel()
    try:
        outcome = await task
    except (asyncio.CancelledError, Exception):  # noqa: BLE001 - a cancelled side's outcome is moot
        return
    if isinstance(outcome, RelayedStream):
        await outcome.discard()


def _raise_or_return(outcome: Response | Exception, who: str) -> Response:
    if isinstance(outcome, AttemptFailed):
        raise outcome
    if isinstance(outcome, Exception):
        log.error("%s: unexpected error: %r", who, outcome)
        return error_response(502, f"{who} failed: {type(outcome).__name__}")
    log.warning("%s refused the request (%d); decode cancelled", who, outcome.status_code)
    return outcome
