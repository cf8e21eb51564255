"""`python -m meshserve.dynamo.worker <launch_server flags>`: a meshserve node serving as an
NVIDIA Dynamo 1.6 backend, found by `python -m dynamo.frontend` as Dynamo's SGLang worker is.

Node 0 registers the model once (token input: the frontend tokenizes and applies the chat
template; chat and completions) under `--served-model-name` and serves Dynamo's endpoint; nodes
r > 0 only run their ranks, as under launch_server. Modes follow `--disaggregation-mode`:
aggregated (default) at `<ns>.backend.generate`; `decode` at `<ns>.backend.generate` needing a
prefill; `prefill` at `<ns>.prefill.generate` with its bootstrap server advertised, so the
frontend sends both halves the same `bootstrap_info` and meshserve's own PD transfer moves the
KV. Discovery and planes come from Dynamo's environment (ETCD_ENDPOINTS, NATS_SERVER,
DYN_NAMESPACE, DYN_REQUEST_PLANE, ...); `--endpoint dyn://ns.component.endpoint` overrides the
endpoint. Other flags of Dynamo's SGLang worker are refused by name.

Cancellation: the frontend stopping a stream (client gone, its own stop match) aborts the
request in meshserve's scheduler. SIGTERM/SIGINT: Dynamo's runtime revokes the lease at once
(the frontend stops routing here), in-flight requests finish, then the node stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from meshserve.config.server_args import ServerArgs
from meshserve.dynamo import protocol

log = logging.getLogger("meshserve.dynamo")

# Flags of Dynamo's SGLang worker (dynamo.sglang, dynamo.common.configuration, 1.6) that this
# worker does not implement: refused by name rather than silently ignored.
UNSUPPORTED_DYNAMO_FLAGS = frozenset("""
--active-decode-blocks-threshold --active-prefill-tokens-threshold --active-prefill-tokens-threshold-frac
--connector --custom-jinja-template --dedicated-mm-encoder --disagg-config --disagg-config-key
--discovery-backend --dump-config-to --dyn-default-thinking-mode --dyn-reasoning-parser --dyn-structural-tag
--dyn-tool-call-parser --embedding-transfer-mode --embedding-worker --enable-multimodal --enable-rl
--enable-session-prefix-index --endpoint-types --enforce-disagg --engine-request-limit --engine-route
--event-plane --exclude-tools-when-tool-choice-none --fpm-trace --frontend-decoding --gateway-workers
--health-check-payload --image-diffusion-worker --kv-state-endpoint --load-aware --media-output-fs-url
--media-output-http-url --migration-limit --multimodal-embedding-cache-capacity-gb
--multimodal-embedding-cache-publisher --namespace --output-modalities --request-plane --rerank-worker
--response-plane --sglang-trace-level --use-sglang-tokenizer --video-generation-worker
""".split())


@dataclass(frozen=True)
class WorkerOptions:
    endpoint: str | None  # "ns.component.endpoint"; None: from the mode


def split_argv(argv: Sequence[str]) -> tuple[list[str], WorkerOptions]:
    """The worker's own flags out of `argv`; the rest are launch_server's. Exits 2 naming a
    Dynamo flag that is not implemented."""
    rest: list[str] = []
    endpoint = None
    it = iter(argv)
    for arg in it:
        name = arg.split("=", 1)[0]
        if name in UNSUPPORTED_DYNAMO_FLAGS:
            sys.stderr.write(f"error: {name} (a flag of Dynamo's SGLang worker) is not supported by "
                             "meshserve.dynamo.worker\n")
            raise SystemExit(2)
        if name == "--endpoint":
            endpoint = arg.split("=", 1)[1] if "=" in arg else next(it, None)
            if not endpoint:
                sys.stderr.write("error: --endpoint needs a value: dyn://namespace.component.endpoint\n")
                raise SystemExit(2)
            endpoint = endpoint.removeprefix("dyn://")
            if len(endpoint.split(".")) != 3:
                sys.stderr.write(f"error: --endpoint {endpoint!r}: expected dyn://namespace.component.endpoint\n")
                raise SystemExit(2)
        else:
            rest.append(arg)
    return rest, WorkerOptions(endpoint)


def default_endpoint(mode: str) -> str:
    namespace = os.environ.get("DYN_NAMESPACE", "dynamo")
    return f"{namespace}.{'prefill' if mode == 'prefill' else 'backend'}.generate"


class DynamoHandler:
    """Dynamo's endpoint handler over an AsyncEngine."""

    def __init__(self, engine: Any, *, with_stop_strings: bool, prefill: bool) -> None:
        self.engine = engine
        self.with_stop_strings = with_stop_strings
        self.prefill = prefill

    async def generate(self, request: dict[str, Any], context: Any) -> AsyncIterator[dict[str, Any]]:
        params = protocol.sampling_params(request, with_stop_strings=self.with_stop_strings)
        where = protocol.bootstrap(request)
        rid = f"dynamo-{context.id()}"
        stream = self.engine.generate(input_ids=list(request["token_ids"]), sampling_params=params, rid=rid,
                                      bootstrap=where)
        # The frontend stops a stream (client gone, its own stop match) through the context:
        # abort the scheduler's request at once instead of at the next yield.
        watcher = asyncio.create_task(self._abort_when_stopped(context, rid))
        from meshserve.server.generation import RequestAborted

        try:
            first = True
            async with contextlib.aclosing(stream) as outputs:
                async for output in outputs:
                    item = protocol.response_item(output)
                    if first and self.prefill and where is not None:
                        # SGLang's prefill handler says where the KV waits; the frontend passes it on.
                        item["disaggregated_params"] = {"bootstrap_host": where.host, "bootstrap_port": where.port,
                                                        "bootstrap_room": where.room}
                    first = False
                    yield item
        except RequestAborted:
            yield protocol.CANCELLED_ITEM
        finally:
            watcher.cancel()

    async def _abort_when_stopped(self, context: Any, rid: str) -> None:
        await context.async_killed_or_stopped()
        if self.engine.abort(rid):
            log.info("request %s cancelled by the frontend", rid)


async def serve(args: ServerArgs, options: WorkerOptions) -> int:
    from meshserve.engine import AsyncEngine
    from meshserve.runtime import StartupError, model_dir

    try:
        engine = await AsyncEngine.create(args=args)
    except StartupError as err:
        log.error("%s", err)
        return 1
    loop = asyncio.get_running_loop()
    try:
        if not engine.leader:
            stopping = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stopping.set)
            signalled = asyncio.ensure_future(stopping.wait())
            stopped = asyncio.ensure_future(engine.wait_stopped())
            await asyncio.wait([signalled, stopped], return_when=asyncio.FIRST_COMPLETED)
            if stopped.done():
                log.info("node %d stopping: %s", args.parallel.node_rank, stopped.result())
                return 0 if engine.stop_clean else 1
            stopped.cancel()
            # A node leaving makes the cluster unable to serve: tell the others (as NodeAgent does).
            await asyncio.to_thread(engine.runtime.cluster.shutdown, clean=False,
                                    reason=f"node {args.parallel.node_rank} received a signal")
            return 0
        return await _serve_dynamo(engine, args, options, model_dir(args))
    finally:
        await engine.shutdown()


async def _serve_dynamo(engine: Any, args: ServerArgs, options: WorkerOptions, model_path: str) -> int:
    from dynamo.llm import ModelInput, ModelRuntimeConfig, ModelType, WorkerType, register_model
    from dynamo.runtime import DistributedRuntime

    loop = asyncio.get_running_loop()
    mode = args.disagg.disaggregation_mode
    runtime = DistributedRuntime(loop, os.environ.get("DYN_DISCOVERY_BACKEND", "etcd"),
                                 os.environ.get("DYN_REQUEST_PLANE", "tcp"))
    path = options.endpoint or default_endpoint(mode)
    endpoint = runtime.endpoint(path)
    config = ModelRuntimeConfig()
    info = engine.tokenizer_manager.scheduler_info
    config.total_kv_blocks = info.max_total_tokens // args.cache.page_size
    config.context_length = info.context_length
    if mode == "prefill":
        host = args.http.host if args.http.host not in ("0.0.0.0", "::") else _host_address()
        config.set_disaggregated_endpoint(host, args.disagg.disaggregation_bootstrap_port)
        model_type, worker_type, needs = ModelType.Prefill, WorkerType.Prefill, [[WorkerType.Decode]]
    elif mode == "decode":
        model_type, worker_type = ModelType.Chat | ModelType.Completions, WorkerType.Decode
        needs = [[WorkerType.Prefill]]
    else:
        model_type, worker_type, needs = ModelType.Chat | ModelType.Completions, WorkerType.Aggregated, None
    name = engine.model_config.served_model_name
    await register_model(ModelInput.Tokens, model_type, endpoint, model_path, name, worker_type=worker_type,
                         needs=needs, kv_cache_block_size=args.cache.page_size, runtime_config=config)
    log.info("registered %s as a Dynamo %s worker at %s", name, worker_type, path)

    def on_signal(sig: signal.Signals) -> None:
        # Dynamo revokes the lease now (the frontend stops routing here) and lets the
        # in-flight handlers finish; serve_endpoint then returns.
        log.info("received %s: unregistering, draining %d request(s)", sig.name,
                 engine.tokenizer_manager.num_in_flight)
        engine.refuse_new(f"the worker is shutting down ({sig.name})")
        runtime.shutdown()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    handler = DynamoHandler(engine, with_stop_strings=engine.runtime.tokenizer is not None,
                            prefill=mode == "prefill")
    serving = asyncio.ensure_future(endpoint.serve_endpoint(handler.generate))
    stopped = asyncio.ensure_future(engine.wait_stopped())
    await asyncio.wait([serving, stopped], return_when=asyncio.FIRST_COMPLETED)
    if stopped.done():  # the cluster or the scheduler failed: leave Dynamo at once
        log.error("stopping: %s", stopped.result())
        runtime.shutdown()
        with contextlib.suppress(Exception):
            await serving
        return 0 if engine.stop_clean else 1
    stopped.cancel()
    serving.result()
    log.info("unregistered and drained")
    return 0


def _host_address() -> str:
    """Where other machines reach this prefill's bootstrap server when it binds every
    interface: the host name's address."""
    import socket

    return socket.gethostbyname(socket.gethostname())


def main(argv: Sequence[str] | None = None) -> int:
    rest, options = split_argv(sys.argv[1:] if argv is None else argv)
    args = ServerArgs.from_cli(rest)
    from meshserve.launch_server import configure_logging
    from meshserve.runtime import StartupError, preflight

    configure_logging(args.http.log_level)
    try:
        preflight(args)
    except StartupError as err:
        log.error("%s", err)
        return 1
    try:
        import dynamo.llm  # noqa: F401 - fail here, in one line, without the package
    except ImportError as err:
        log.error("cannot start: NVIDIA Dynamo is not installed (%s); see docs/deploy.md", err)
        return 1
    return asyncio.run(serve(args, options))


if __name__ == "__main__":
    code = main()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
