"""The router's HTTP app: generation routes forwarded by the mode's proxy, the workers' model
and info routes, its own health, metrics and worker management (sglang-router's names)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
from fastapi import FastAPI, Request
from fastapi.responses import Response

from meshserve import __version__
from meshserve.router.args import RouterArgs
from meshserve.router.auth import BearerKeyMiddleware
from meshserve.router.health import HealthMonitor
from meshserve.router.metrics import CONTENT_TYPE, RouterMetrics
from meshserve.router.pd_proxy import PDProxy
from meshserve.router.policies import make_policy
from meshserve.router.pool import WorkerPool
from meshserve.router.proxy import RegularProxy
from meshserve.router.upstream import AttemptFailed, Upstream, error_response, passthrough
from meshserve.router.worker import Role, Worker
from meshserve.server.http_limits import BodyLimitMiddleware, HttpLimits

GENERATION_ROUTES = ("/v1/chat/completions", "/v1/completions", "/generate")
# Answered by one healthy worker of the serving role (no policy: they must not shift its turns).
WORKER_INFO_ROUTES = ("/v1/models", "/get_model_info", "/model_info")
CONNECT_TIMEOUT_S = 10.0
# Slow or hostile clients get the server's bounds (meshserve.server.http_limits): headers within
# HEADER_TIMEOUT_S (enforced by the protocol launch_router gives uvicorn), the body within
# BODY_TIMEOUT_S and --max-payload-size.
HEADER_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0


def json_response(body: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(body), status_code=status, media_type="application/json")


def build_pool(args: RouterArgs, rng: random.Random) -> WorkerPool:
    if args.pd_disaggregation:
        policies = {Role.PREFILL: make_policy(args.prefill_policy_name, args.cache_aware, rng),
                    Role.DECODE: make_policy(args.decode_policy_name, args.cache_aware, rng)}
    else:
        policies = {Role.REGULAR: make_policy(args.policy, args.cache_aware, rng)}
    pool = WorkerPool(args.health, args.cb_failure_threshold, policies)
    for url in args.worker_urls:
        pool.add(url, Role.REGULAR)
    for prefill in args.prefill:
        pool.add(prefill.url, Role.PREFILL, prefill.bootstrap_port)
    for url in args.decode:
        pool.add(url, Role.DECODE)
    return pool


def _describe(worker: Worker) -> dict[str, Any]:
    return {"url": worker.url, "role": worker.role.value, "healthy": worker.healthy,
            "bootstrap_port": worker.bootstrap_port, "in_flight": worker.in_flight, "load": worker.load}


def create_router_app(args: RouterArgs, rng: random.Random | None = None) -> FastAPI:
    rng = rng or random.Random()
    pool = build_pool(args, rng)
    metrics = RouterMetrics(pool)
    # trust_env=False: traffic to the workers never goes through a proxy from the environment.
    client = httpx.AsyncClient(timeout=httpx.Timeout(args.request_timeout_s, connect=CONNECT_TIMEOUT_S),
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
                               trust_env=False)
    upstream = Upstream(client, pool, metrics, args.api_key)
    worker_headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    monitor = HealthMonitor(pool, client, args.health, worker_headers)
    proxy = PDProxy(upstream, args.max_retries, rng) if args.pd_disaggregation else RegularProxy(upstream, args.max_retries)
    serving_role = Role.DECODE if args.pd_disaggregation else Role.REGULAR

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        checks = asyncio.create_task(monitor.run())
        try:
            yield
        finally:
            checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await checks
            await client.aclose()

    app = FastAPI(title="meshserve router", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.state.pool = pool

    async def generation(request: Request) -> Response:
        return await proxy.forward(request, request.url.path)

    for path in GENERATION_ROUTES:
        app.add_api_route(path, generation, methods=["POST"])

    async def worker_info(request: Request) -> Response:
        for worker in pool.healthy(serving_role):
            try:
                exchange = await upstream.start(worker, "GET", request.url.path, b"", upstream.headers(request))
                return passthrough(exchange, await upstream.read(exchange))
            except AttemptFailed:
                continue
        return error_response(503, f"no healthy {serving_role.value} worker", code="service_unavailable")

    for path in WORKER_INFO_ROUTES:
        app.add_api_route(path, worker_info, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", worker_info, methods=["GET"])

    @app.get("/health")
    async def health() -> Response:
        missing = [role.value for role in pool.roles if not pool.healthy(role)]
        if missing:
            return error_response(503, f"no healthy {' or '.join(missing)} worker", code="service_unavailable")
        return Response(status_code=200)

    @app.get("/get_server_info")
    @app.get("/server_info")
    async def server_info(request: Request) -> Response:
        """The router's settings (key masked) and each worker's own server info."""
        settings = dataclasses.asdict(args)
        settings["api_key"] = "***" if args.api_key else None

        async def info(worker: Worker) -> dict[str, Any]:
            try:
                response = await client.get(worker.url + "/get_server_info", headers=worker_headers,
                                            timeout=args.health.timeout_s)
                return {**_describe(worker), "server_info": response.json()}
            except (httpx.HTTPError, ValueError) as err:
                return {**_describe(worker), "error": f"{type(err).__name__}: {err}"}

        workers = await asyncio.gather(*(info(w) for w in pool.workers()))
        return json_response({"router": {**settings, "version": __version__}, "workers": workers})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/list_workers")
    async def list_workers() -> Response:
        workers = pool.workers()
        return json_response({"urls": [w.url for w in workers], "workers": [_describe(w) for w in workers]})

    @app.post("/add_worker")
    async def add_worker(url: str, worker_type: str | None = None, bootstrap_port: int | None = None) -> Response:
        """Added once its health endpoint answers 200, so a typo is refused here and then."""
        url = url.rstrip("/")
        valid = {r.value for r in pool.roles}
        if worker_type is not None and worker_type not in valid:
            return error_response(400, f"worker_type must be one of {', '.join(sorted(valid))}")
        role = Role(worker_type) if worker_type else serving_role
        try:
            probe = await client.get(url + args.health.endpoint, headers=worker_headers, timeout=args.health.timeout_s)
            problem = None if probe.status_code == 200 else f"status {probe.status_code}"
        except httpx.HTTPError as err:
            problem = f"{type(err).__name__}: {err}"
        if problem:
            return error_response(400, f"worker {url} is not healthy: {problem}")
        try:
            pool.add(url, role, bootstrap_port)
        except ValueError as err:
            return error_response(400, str(err))
        return Response(f"Successfully added worker: {url}", media_type="text/plain")

    @app.post("/remove_worker")
    async def remove_worker(url: str) -> Response:
        if pool.remove(url.rstrip("/")) is None:
            return error_response(404, f"no worker {url}")
        return Response(f"Successfully removed worker: {url}", media_type="text/plain")

    # The last added runs first: the key is checked before a body is read.
    app.add_middleware(BodyLimitMiddleware, limits=HttpLimits(header_timeout=HEADER_TIMEOUT_S,
                                                              body_timeout=BODY_TIMEOUT_S,
                                                              max_body_size=args.max_payload_size))
    if args.api_key:
        app.add_middleware(BearerKeyMiddleware, api_key=args.api_key)
    return app
