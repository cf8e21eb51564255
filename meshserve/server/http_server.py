"""The HTTP server: a FastAPI app over one TokenizerManager, run by uvicorn in the main process.

Routes: OpenAI (/v1/chat/completions, /v1/completions, /v1/models), SGLang native (/generate,
/health, /health_generate, /get_model_info, /get_server_info, /get_load, /flush_cache; /model_info
and /server_info are aliases) and /metrics.

Invariants:
* --api-key is checked in ONE place (ApiKeyMiddleware) for every route except OPEN_PATHS.
* Every error is an OpenAI-style JSON body with a 4xx/5xx status; malformed JSON and wrong types
  are 400, never 500 and never a hang.
* A request whose client disconnects is aborted in the scheduler, streaming or not.
* When the scheduler fails, /health turns 503, in-flight requests get errors, and `serve`
  returns exit code 1 after uvicorn's graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from meshserve import __version__
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.sampling_params import SamplingParams
from meshserve.server import disconnect
from meshserve.server import openai_api as oai
from meshserve.server.generation import (
    GenerateError,
    GenerateRequest,
    InvalidRequest,
    SequenceOutput,
    SequenceResult,
)
from meshserve.server.http_limits import MAX_HEADER_BYTES, BodyLimitMiddleware, HttpLimits, bounded_protocol
from meshserve.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from meshserve.server.metrics import ServerMetrics
from meshserve.server.native_api import GenerateReqInput, native_response
from meshserve.server.tokenizer_manager import PreparedRequest, TokenizerManager
from meshserve.server.tool_calls import ToolCallStream, default_tool_call_parser

if TYPE_CHECKING:
    from meshserve.runtime import NodeRuntime

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# Routes that answer without the API key: probes and scraping must work without the secret.
OPEN_PATHS = frozenset({"/health", "/health_generate", "/metrics"})
GRACEFUL_SHUTDOWN_S = 10
# On SIGTERM, requests in flight get this long to finish before they are aborted (503).
DRAIN_S = 5.0
HEALTH_GENERATE_TIMEOUT_S = 20.0
RECENT_PROGRESS_S = 5.0


@dataclass(frozen=True)
class AppContext:
    tm: TokenizerManager
    args: ServerArgs
    model_config: ModelConfig
    metrics: ServerMetrics
    # Why the cluster cannot serve (a node or rank lost), or None; /health turns 503 at once.
    cluster_problem: Callable[[], str | None] = lambda: None


def json_response(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def error_response(err: oai.APIError) -> Response:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    response = json_response(err.body(), err.status)
    if headers:
        response.headers.update(headers)
    return response


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as `model`, whatever the Content-Type says (SGLang's examples post JSON
    with curl -d, i.e. as form data). Errors raise ValidationError, answered with a 400."""
    return model.model_validate_json(await request.body())


async def http_error(_: Request, err: Exception) -> Response:
    """Routing errors (unknown path, wrong method) in the OpenAI error shape; every node's app uses it."""
    assert isinstance(err, StarletteHTTPException)
    return error_response(oai.APIError(err.status_code, str(err.detail)))


def validation_error(problems: Sequence[Any]) -> oai.APIError:
    """pydantic errors -> one 400 naming each bad field."""
    return oai.APIError.from_generate_error(InvalidRequest.from_problems(problems))


# ---- API key -------------------------------------------------------------------------------


class ApiKeyMiddleware:
    """The single choke point for --api-key: `Authorization: Bearer <key>` on every route but
    OPEN_PATHS (an allow-list, so a new route is guarded by default)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                err = oai.APIError(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>')",
                                   code="invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- disconnects and streams ---------------------------------------------------------------


async def until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work`, cancelling it (so its requests are aborted) if the client disconnects
    first; then returns None, and nothing can reach the client anyway."""
    try:
        return await disconnect.until_disconnect(request, work)
    except disconnect.ClientGone:
        log.info("client disconnected; aborting its request")
        return None


async def event_stream(
    tm: TokenizerManager,
    prepared: PreparedRequest,
    render: Callable[[SequenceOutput, SequenceResult], bytes],
    prologue: Iterable[bytes] = (),
    epilogue: Callable[[list[SequenceResult]], Iterable[bytes]] = lambda results: (),
) -> AsyncIterator[bytes]:
    """SSE events of one request: prologue, one rendered event per output (given the output and
    its sequence's accumulated result; b"" to send nothing), epilogue, [DONE]. An error
    mid-stream becomes an error event. A client disconnect cancels this generator (Starlette),
    which aborts the request.

    Invariant: once the 200 and the first bytes are out, the stream always ends with `[DONE]`,
    after an error event if anything failed -- whatever the exception (a client must never see
    a cut connection it cannot tell from a network fault)."""
    results = [SequenceResult(index=i) for i in range(prepared.n)]
    try:
        for event in prologue:
            yield event
        async with contextlib.aclosing(tm.generate(prepared)) as outputs:
            async for out in outputs:
                result = results[out.index]
                result.add(out)
                event = render(out, result)
                if event:
                    yield event
    except GenerateError as err:
        yield oai.sse(oai.APIError.from_generate_error(err).body())
    except Exception as err:  # noqa: BLE001 - see the invariant above
        log.exception("unexpected error in a response stream")
        yield oai.sse(oai.APIError(500, f"internal server error: {type(err).__name__}").body())
    else:
        for event in epilogue(results):
            yield event
    yield oai.SSE_DONE


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- the app -------------------------------------------------------------------------------


def create_app(ctx: AppContext, limits: HttpLimits | None = None) -> FastAPI:
    """The app; `limits` bound each request's body (the server always passes them)."""
    app = FastAPI(title="meshserve", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    tm, model_config = ctx.tm, ctx.model_config
    served_name = model_config.served_model_name
    tool_call_parser = ctx.args.http.tool_call_parser or default_tool_call_parser(model_config.architecture)

    # -- errors --

    @app.exception_handler(oai.APIError)
    async def _api_error(_: Request, err: oai.APIError) -> Response:
        return error_response(err)

    @app.exception_handler(GenerateError)
    async def _generate_error(_: Request, err: GenerateError) -> Response:
        return error_response(oai.APIError.from_generate_error(err))

    @app.exception_handler(ValidationError)
    async def _validation_error(_: Request, err: ValidationError) -> Response:
        return error_response(validation_error(err.errors()))

    @app.exception_handler(RequestValidationError)
    async def _request_validation_error(_: Request, err: RequestValidationError) -> Response:
        return error_response(validation_error(err.errors()))

    app.add_exception_handler(StarletteHTTPException, http_error)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> Response:
        log.exception("unexpected error while serving a request")
        return error_response(oai.APIError(500, f"internal server error: {type(err).__name__}"))

    # -- OpenAI --

    def response_context(prefix: str, prepared: PreparedRequest) -> oai.ResponseContext:
        return oai.ResponseContext.new(
            prefix, served_name, tm.token_text,
            logprobs=prepared.return_logprob,
            include_token_ids=tm.tokenizer is None,
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await parse_body(request, oai.ChatCompletionRequest)
        oai.check_model(body.model, served_name, model_config.model_path)
        tools = body.tool_request(tool_call_parser)
        prepared = await tm.prepare(body.to_generate_request(model_config.sampling_defaults, tools))
        rctx = response_context("chatcmpl", prepared)
        include_usage = body.include_usage
        if body.stream:
            streams = {i: ToolCallStream(tools.format) if tools.format else None for i in range(prepared.n)}
            return sse_response(event_stream(
                tm, prepared,
                render=lambda out, _: oai.sse(oai.chat_delta_chunk(rctx, out, include_usage, streams[out.index])),
                prologue=[oai.sse(oai.chat_role_chunk(rctx, i, include_usage)) for i in range(prepared.n)],
                epilogue=lambda results: [oai.sse(oai.usage_chunk(rctx, "chat.completion.chunk", results))]
                if include_usage else [],
            ))
        results = await until_disconnect(request, tm.collect(prepared))
        return json_response(oai.chat_completion_response(rctx, results, tools.format) if results else None)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await parse_body(request, oai.CompletionRequest)
        oai.check_model(body.model, served_name, model_config.model_path)
        prepared = await tm.prepare(body.to_generate_request(model_config.sampling_defaults))
        rctx = response_context("cmpl", prepared)
        include_usage = body.include_usage
        if body.stream:
            return sse_response(event_stream(
                tm, prepared,
                render=lambda out, result: oai.sse(
                    oai.completion_delta_chunk(rctx, out, include_usage, len(result.text) - len(out.text))
                ),
                epilogue=lambda results: [oai.sse(oai.usage_chunk(rctx, "text_completion", results))]
                if include_usage else [],
            ))
        results = await until_disconnect(request, tm.collect(prepared))
        return json_response(oai.completion_response(rctx, results) if results else None)

    created = int(time.time())  # the server's start, as vLLM and SGLang report it

    def card() -> dict[str, Any]:
        return {
            "id": served_name,
            "object": "model",
            "created": created,
            "owned_by": "meshserve",
            "root": model_config.model_path,
            "max_model_len": model_config.context_length,
        }

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [card()]})

    @app.get("/v1/models/{model:path}")
    async def model_card(model: str) -> Response:
        oai.check_model(model, served_name, model_config.model_path)
        return json_response(card())

    # -- SGLang native --

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await parse_body(request, GenerateReqInput)
        if body.stream and body.is_batch:
            raise oai.APIError(400, "streaming a batch of prompts is not supported yet", param="stream")
        prepared = [await tm.prepare(r) for r in body.to_generate_requests()]
        token_text = tm.token_text if body.return_text_in_logprobs else None

        def render(result: SequenceResult) -> dict[str, Any]:
            return native_response(result, return_logprob=body.return_logprob,
                                   top_logprobs_num=body.top_logprobs_num, token_text=token_text)

        if body.stream:
            single = prepared[0]
            return sse_response(event_stream(
                tm, single,
                render=lambda out, result: oai.sse({**render(result), **({"index": out.index} if single.n > 1 else {})}),
            ))
        results = await until_disconnect(request, tm.collect_many(prepared))
        if results is None:
            return json_response(None)
        bodies = [render(r) for per_request in results for r in per_request]
        return json_response(bodies[0] if len(bodies) == 1 and not body.is_batch else bodies)

    @app.get("/health")
    async def health() -> Response:
        reason = ctx.cluster_problem() or tm.not_ready_reason
        if reason is None:
            return Response(status_code=200)
        return error_response(oai.APIError(503, f"not ready: {reason}", code="service_unavailable"))

    @app.get("/health_generate")
    async def health_generate() -> Response:
        """Ready, and the scheduler makes progress: a busy scheduler that produced output in
        the last seconds is healthy (a probe would queue behind its work, as in SGLang);
        otherwise a one-token generation must complete in time."""
        if not tm.ready or ctx.cluster_problem():
            return await health()
        if tm.num_in_flight and time.monotonic() - tm.last_output_at < RECENT_PROGRESS_S:
            return Response(status_code=200)
        probe = GenerateRequest(input_ids=[1], sampling=SamplingParams(max_new_tokens=1, temperature=0.0))
        try:
            await asyncio.wait_for(tm.collect(await tm.prepare(probe)), HEALTH_GENERATE_TIMEOUT_S)
        except (GenerateError, TimeoutError) as err:
            return error_response(oai.APIError(503, f"generation failed: {err or 'timed out'}",
                                               code="service_unavailable"))
        return Response(status_code=200)

    # sglang-router asks for /model_info and /server_info first, then the older get_ names.
    @app.get("/get_model_info")
    @app.get("/model_info")
    async def get_model_info() -> Response:
        return json_response({
            "model_path": model_config.model_path,
            "tokenizer_path": model_config.tokenizer_path,
            "served_model_name": served_name,
            "is_generation": True,
            "architecture": model_config.architecture,
            # SGLang's field names (the router and tools read them); the config's full list.
            "architectures": list(model_config.hf_config.architectures or [model_config.architecture]),
            "model_type": model_config.hf_config.model_type,
            "dtype": model_config.dtype,
            "context_length": model_config.context_length,
            "vocab_size": model_config.vocab_size,
        })

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def get_server_info() -> Response:
        """SGLang's shape: every server argument at the top level under its flag's name (what
        sglang-router parses; one nested object there fails its whole parse), with the values
        the server actually runs with; meshserve's per-concern groups alongside. The concern
        `model` is left out: that name is the served model's name, a string, in SGLang's shape.
        to_dict() masks the api key: this route must never echo a secret."""
        concerns = ctx.args.to_dict()
        flat = {name: value for values in concerns.values() for name, value in values.items()}
        running = tm.scheduler_info
        return json_response({
            **{concern: values for concern, values in concerns.items() if concern != "model"},
            **flat,
            "model": served_name,
            "served_model_name": served_name,
            "model_path": model_config.model_path,
            "context_length": model_config.context_length,
            "max_total_tokens": running.max_total_tokens if running else flat["max_total_tokens"],
            "version": __version__,
            "scheduler_info": running,
            "scheduler_stats": tm.stats,
        })

    @app.get("/get_load")
    async def get_load() -> Response:
        """The scheduler's latest load report, every field of it (so fields added to
        SchedulerStats appear here unchanged), and the requests this server has in flight;
        the router's power-of-two and cache-aware policies read it. With --dp-size > 1 the
        counts are summed over the DP groups, and `dp_groups` holds each group's own report."""
        stats = msgspec.structs.asdict(tm.stats) if tm.stats is not None else {}
        groups = tm.dp_group_stats
        per_group = {"dp_groups": [msgspec.structs.asdict(g) for g in groups]} if len(groups) > 1 else {}
        return json_response({**stats, "num_in_flight": tm.num_in_flight, **per_group})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        reply = await tm.flush_cache()
        if reply.success:
            return Response("Cache flushed.\n", status_code=200)
        return error_response(oai.APIError(400, f"Cache not flushed: {reply.message}"))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    # The last added runs first: the key is checked before a body is read.
    if limits is not None:
        app.add_middleware(BodyLimitMiddleware, limits=limits)
    if ctx.args.http.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=ctx.args.http.api_key)
    return app


# ---- running it ----------------------------------------------------------------------------


class UvicornServer(uvicorn.Server):
    """uvicorn.Server whose signal handling is ours (see ServerRunner): uvicorn's would re-raise
    the signal after shutdown and kill the process before the schedulers are stopped."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        yield


class ServerRunner:
    """Starts the TokenizerManager, serves HTTP until a signal or a scheduler failure, and
    reports the exit code (0 after a signal, 1 after a failure)."""

    def __init__(self, runtime: NodeRuntime, sock: socket.socket) -> None:
        args, model_config, cluster = runtime.args, runtime.model_config, runtime.cluster
        self.metrics = ServerMetrics(model_config.served_model_name)
        self.tm = runtime.tokenizer_manager(self.metrics)
        self.cluster = cluster
        self.tm.on_failure(self._on_scheduler_failure)
        http = args.http
        limits = HttpLimits(header_timeout=http.http_header_timeout, body_timeout=http.http_body_timeout,
                            max_body_size=http.http_max_body_size)
        app = create_app(AppContext(self.tm, args, model_config, self.metrics, cluster_problem=cluster.problem),
                         limits)
        config = uvicorn.Config(
            app,
            # Header deadline, JSON 400s; answers sglang-router's gRPC probe without a warning.
            http=bounded_protocol(limits.header_timeout),
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            timeout_keep_alive=http.http_keep_alive_timeout,
            log_level=args.http.log_level,
            log_config=None,  # the root logger set up by launch_server
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            lifespan="off",
        )
        self.server = UvicornServer(config)
        self.sock = sock
        self.address = f"http://{args.http.host}:{args.http.port}"
        self.exit_code = 0
        self._stopping = False
        self._starting: asyncio.Task[Any] | None = None

    def _on_scheduler_failure(self, reason: str) -> None:
        # The cluster settles on one reason for every node (this rank's error may be the
        # consequence of another node's dead rank) and stops us via _on_cluster_failure.
        self.cluster.report_failure(reason)

    def _on_cluster_failure(self, reason: str, clean: bool) -> None:
        """From a coordinator thread: another node failed or node 0 asked everyone to stop."""
        self._loop.call_soon_threadsafe(self.stop, f"cluster {'stop' if clean else 'failure'}: {reason}",
                                        0 if clean else 1)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.cluster.on_failure(self._on_cluster_failure)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            self._starting = asyncio.create_task(self.tm.start())
            try:
                info = await self._starting
            except asyncio.CancelledError:
                return self.exit_code
            except GenerateError:
                log.error("the scheduler failed to start: %s", self.tm.failure)
                return 1
            log.info("scheduler ready: %s", info)
            warm_up = asyncio.create_task(self._warm_up())
            await self.server.serve(sockets=[self.sock])
            warm_up.cancel()
            return self.exit_code
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.tm.close()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stopping:  # a second Ctrl-C: skip the graceful wait
            self.server.force_exit = True
        self.stop(f"received {sig.name}")

    def stop(self, reason: str, exit_code: int = 0) -> None:
        """Shut down (once): stop accepting, abort in-flight requests (they get 503s) — at
        once after a failure, after DRAIN_S for a requested stop (they may finish) — exit."""
        if self._stopping:
            return
        self._stopping = True
        self.exit_code = exit_code
        (log.error if exit_code else log.info)("shutting down: %s", reason)
        why = f"the server is shutting down ({reason})"
        if exit_code == 0 and self.tm.num_in_flight:
            log.info("draining %d request(s) for up to %.0f s", self.tm.num_in_flight, DRAIN_S)
            self._loop.call_later(DRAIN_S, self.tm.abort_all, why)
        else:
            self.tm.abort_all(why)
        self.server.should_exit = True
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()

    async def _warm_up(self) -> None:
        try:
            await self.tm.warm_up()
        except GenerateError as err:
            self.stop(f"the warm-up generation failed: {err}", exit_code=1)
            return
        log.info("The server is fired up and ready to roll! Serving on %s", self.address)


async def serve(runtime: NodeRuntime, sock: socket.socket) -> int:
    """Run node 0's HTTP server until shutdown; the process exit code."""
    return await ServerRunner(runtime, sock).run()
