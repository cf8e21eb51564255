"""Small worker apps for the router's tests: real HTTP servers (uvicorn in a thread, on 127.0.0.1)
that record what they receive and answer as told — an answer, an error status, a stream cut in
the middle, or a wait until the client hangs up. Also serves the router's own app in-process."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from tests.server_process import free_port

STREAM_EVENTS = 3


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    authorization: str | None


@dataclass
class FakeWorker:
    name: str
    url: str = ""
    received: list[Received] = field(default_factory=list)
    healthy: bool = True  # /health answers 200, else 503
    status: int = 200  # answer with this status (an OpenAI-style error body when not 200)
    hang: bool = False  # keep the request open until the client goes away
    cut_stream: bool = False  # send one event, then drop the connection
    delay_s: float = 0.0  # wait this long before answering (a decode waiting for its KV)
    # Answer only once this worker has received a request too (500 after 10 s): a prefill that
    # needs its decode to have the request, as a real KV transfer does.
    peer: FakeWorker | None = None
    # Streams: after the first event, wait until this is set (proves bytes are relayed as sent).
    gate: threading.Event | None = None
    load: int = 0  # what /get_load reports as num_in_flight
    hung_up: int = 0  # requests whose client went away while hanging
    answered: threading.Event = field(default_factory=threading.Event)

    def app(self) -> FastAPI:
        app = FastAPI()

        async def generate(request: Request) -> Response:
            try:
                body = msgspec.json.decode(await request.body())
            except msgspec.DecodeError:
                return Response(b'{"error": {"message": "not JSON"}}', status_code=400, media_type="application/json")
            self.received.append(Received(request.url.path, body, request.headers.get("authorization")))
            if self.hang:
                while not await request.is_disconnected():
                    await asyncio.sleep(0.02)
                self.hung_up += 1
                return Response(status_code=499)
            await asyncio.sleep(self.delay_s)
            deadline = time.monotonic() + 10
            while self.peer is not None and not self.peer.received:
                if time.monotonic() > deadline:
                    return Response(status_code=500)
                await asyncio.sleep(0.01)
            if self.status != 200:
                error = {"error": {"message": f"{self.name} says no", "code": self.status}}
                return Response(msgspec.json.encode(error), status_code=self.status, media_type="application/json")
            self.answered.set()
            if body.get("stream"):
                return StreamingResponse(self._events(), media_type="text/event-stream")
            return Response(msgspec.json.encode({"worker": self.name, "body": body}), media_type="application/json")

        for path in ("/generate", "/v1/chat/completions", "/v1/completions"):
            app.add_api_route(path, generate, methods=["POST"])

        @app.get("/health")
        async def health() -> Response:
            return Response(status_code=200 if self.healthy else 503)

        @app.get("/get_load")
        async def get_load() -> Response:
            return Response(msgspec.json.encode({"num_in_flight": self.load}), media_type="application/json")

        @app.get("/v1/models")
        async def models() -> Response:
            return Response(msgspec.json.encode({"data": [{"id": f"model-of-{self.name}"}]}),
                            media_type="application/json")

        return app

    async def _events(self):
        for i in range(STREAM_EVENTS):
            yield b"data: " + msgspec.json.encode({"worker": self.name, "i": i}) + b"\n\n"
            if self.cut_stream:
                raise RuntimeError("cut")  # uvicorn drops the connection mid-body
            while self.gate is not None and not self.gate.is_set():
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.01)
        yield b"data: [DONE]\n\n"


@contextlib.contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """`app` on a free 127.0.0.1 port in a thread; yields its base URL; stopped on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the app did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@contextlib.contextmanager
def fake_workers(*names: str) -> Iterator[list[FakeWorker]]:
    with contextlib.ExitStack() as stack:
        workers = [FakeWorker(name) for name in names]
        for worker in workers:
            worker.url = stack.enter_context(serve(worker.app()))
        yield workers


@contextlib.contextmanager
def dead_url() -> Iterator[str]:
    """The URL of a port that refuses connections: bound (so no other server can take it
    meanwhile) but not listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def sse_events(text: str) -> list[Any]:
    """The data of each SSE event; "[DONE]" as is."""
    events = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else msgspec.json.decode(data))
    return events
