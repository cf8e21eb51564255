"""RegularProxy: a request goes to one worker picked by the policy; retried on another while
nothing has reached the client (see upstream.py for what counts as a failure)."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import Response

from meshserve.router.request_body import RequestBody
from meshserve.router.upstream import AttemptFailed, Upstream, error_response, passthrough
from meshserve.router.worker import Role, Worker
from meshserve.server.disconnect import ClientGone, until_disconnect

CLIENT_GONE_STATUS = 499  # nginx's "client closed request"; nobody reads it


class RegularProxy:
    def __init__(self, upstream: Upstream, max_retries: int) -> None:
        self.upstream = upstream
        self.max_retries = max_retries

    async def forward(self, request: Request, path: str) -> Response:
        body = RequestBody.parse(await request.body())
        headers = self.upstream.headers(request)
        tried: list[str] = []
        failure = "no healthy worker"
        for attempt in range(self.max_retries + 1):
            worker = self.upstream.pool.pick(Role.REGULAR, body.text, tried)
            if worker is None:
                break
            if attempt:
                self.upstream.metrics.retried()
            tried.append(worker.url)
            try:
                return await until_disconnect(request, self._attempt(worker, request.method, path, body, headers))
            except AttemptFailed as err:
                failure = str(err)
            except ClientGone:
                return Response(status_code=CLIENT_GONE_STATUS)
        return error_response(503, f"no worker could serve the request after {len(tried)} attempt(s): {failure}",
                              code="service_unavailable")

    async def _attempt(self, worker: Worker, method: str, path: str, body: RequestBody,
                       headers: dict[str, str]) -> Response:
        exchange = await self.upstream.start(worker, method, path, body.raw, headers)
        if body.stream and exchange.response.status_code == 200:
            first, chunks = await self.upstream.first_chunk(exchange)
            return self.upstream.stream_response(exchange, first, chunks)
        return passthrough(exchange, await self.upstream.read(exchange))
