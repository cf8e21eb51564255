"""meshserve.AsyncEngine and meshserve.Engine: the in-process API over the same node runtime
(meshserve.runtime.NodeRuntime) as the HTTP server.

    engine = await meshserve.AsyncEngine.create(device="cpu", max_total_tokens=4096)
    async for out in engine.generate("The capital of France is", {"max_new_tokens": 16}):
        print(out.text, end="")            # out: a SequenceOutput (deltas, finish, usage)
    await engine.shutdown()

    with meshserve.Engine(device="cpu", max_total_tokens=4096) as engine:   # synchronous
        print(engine.generate("The capital of France is", {"max_new_tokens": 16})["text"])

AsyncEngine is what every integration stands on (the Engine, the Dynamo worker). It runs on
the caller's event loop: node 0's TokenizerManager lives there. Streaming yields one
SequenceOutput per scheduler step that produced something: the new token ids, the new text,
`finish` on the last one, and the running prompt/completion/cached token counts (the usage).
A stream ends early, and its request is aborted in the scheduler, when the consumer closes it,
when the consumer's task is cancelled, or when `abort(rid)` is called (the stream then raises
RequestAborted).

Multi-node (`nnodes > 1`): every node builds an AsyncEngine with its own `node_rank`; node 0
holds the API, the others only run their ranks (`wait_stopped()` until the cluster stops), as
launch_server's nodes do.

Engine is the synchronous wrapper: an AsyncEngine on an event loop in a background thread;
`generate` submits every prompt of a call at once, so they batch in the scheduler, and returns
the native /generate response shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

from meshserve.config.server_args import ServerArgs
from meshserve.messages import Bootstrap
from meshserve.runtime import NodeRuntime, StartupError, preflight
from meshserve.server.generation import (
    GenerateError,
    GenerateRequest,
    InvalidRequest,
    SequenceOutput,
    ServiceUnavailable,
)
from meshserve.server.native_api import engine_requests, native_response
from meshserve.server.tokenizer_manager import TokenizerManager

T = TypeVar("T")

SamplingDict = dict[str, Any]


class AsyncEngine:
    """Build with `await AsyncEngine.create(...)`; stop with `await shutdown()`."""

    def __init__(self, runtime: NodeRuntime, tm: TokenizerManager | None, loop: asyncio.AbstractEventLoop) -> None:
        self.runtime = runtime
        self.args = runtime.args
        self.model_config = runtime.model_config
        self._tm = tm
        self._loop = loop
        self._stopped = asyncio.Event()
        self.stop_reason: str | None = None
        self.stop_clean = True
        self._closed = False

    @classmethod
    async def create(cls, model_path: str | None = None, *, args: ServerArgs | None = None,
                     **server_args: Any) -> AsyncEngine:
        """Start this node: either `args` (parsed launch_server flags) or ServerArgs fields by
        name (device="cpu", max_total_tokens=4096, ...). Raises ServerArgsError for bad values
        and StartupError (a RuntimeError) with the reason when the node cannot start."""
        if args is None:
            args = ServerArgs().replace(model_path=model_path, **server_args).validate()
        preflight(args)
        runtime = await asyncio.to_thread(NodeRuntime.start, args)  # blocking: waits for nodes, spawns ranks
        tm = runtime.tokenizer_manager() if runtime.leader else None
        engine = cls(runtime, tm, asyncio.get_running_loop())
        runtime.cluster.on_failure(engine._on_cluster_stop)
        if tm is not None:
            # The cluster settles on one reason for every node and stops us via _on_cluster_stop.
            tm.on_failure(lambda reason: runtime.cluster.report_failure(reason))
            try:
                await tm.start()
            except GenerateError as err:
                await engine.shutdown()
                raise StartupError(f"the scheduler failed to start: {err}") from None
        return engine

    @property
    def leader(self) -> bool:
        """Node 0: the one that holds the API."""
        return self.runtime.leader

    @property
    def tokenizer_manager(self) -> TokenizerManager:
        """Node 0's scheduler connection (readiness, load, token texts)."""
        return self._api()

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, prompt: str | None = None, sampling_params: SamplingDict | None = None, *,
                       input_ids: list[int] | None = None, rid: str | None = None,
                       bootstrap: Bootstrap | None = None) -> AsyncIterator[SequenceOutput]:
        """Stream one request (text or token ids) with /generate's sampling parameters
        (SGLang's names). `rid` names it for abort(); `bootstrap`: where a PD request's halves
        meet (PD engines only). Bad requests raise InvalidRequest (a ValueError)."""
        requests, batch = engine_requests(prompt, sampling_params, input_ids)
        if batch:
            raise InvalidRequest("generate streams one prompt; use complete() for a batch")
        request = dataclasses.replace(requests[0], rid=rid if rid is not None else requests[0].rid,
                                      bootstrap=bootstrap)
        async with contextlib.aclosing(self.stream(request)) as outputs:
            async for output in outputs:
                yield output

    async def stream(self, request: GenerateRequest) -> AsyncIterator[SequenceOutput]:
        """generate() for a GenerateRequest built by the caller (chat messages, n > 1, logprobs)."""
        tm = self._api()
        prepared = await tm.prepare(request)
        async with contextlib.aclosing(tm.generate(prepared)) as outputs:
            async for output in outputs:
                yield output

    async def complete(self, prompt: str | list[str] | None = None,
                       sampling_params: SamplingDict | list[SamplingDict] | None = None,
                       input_ids: list[int] | list[list[int]] | None = None) -> dict[str, Any] | list[dict[str, Any]]:
        """Run one prompt or a batch to the end, all at once (they batch in the scheduler), in
        the native /generate response shape: one dict for one prompt (a list of n dicts when
        n > 1), a list with one dict per prompt and sample for a batch."""
        requests, batch = engine_requests(prompt, sampling_params, input_ids)
        tm = self._api()
        results = await tm.collect_many([await tm.prepare(r) for r in requests])
        bodies = [[native_response(r) for r in per_prompt] for per_prompt in results]
        if batch:
            return [body for per_prompt in bodies for body in per_prompt]
        return bodies[0][0] if len(bodies[0]) == 1 else bodies[0]

    def abort(self, rid: str) -> bool:
        """Abort request `rid`: its stream raises RequestAborted and the scheduler frees it.
        False when no such request is in flight."""
        return self._api().abort(rid)

    # ---- lifecycle -----------------------------------------------------------------------

    def refuse_new(self, reason: str) -> None:
        """Refuse new requests from now on (ServiceUnavailable); in-flight ones go on."""
        if self._tm is not None:
            self._tm.stop_accepting(reason)

    async def wait_stopped(self) -> str:
        """Until the cluster stops (node 0 shut down, a node or rank failed); the reason."""
        await self._stopped.wait()
        assert self.stop_reason is not None
        return self.stop_reason

    async def shutdown(self, reason: str = "the engine is shutting down") -> None:
        """End in-flight requests (ServiceUnavailable), stop the ranks (node 0: every node's).
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._tm is not None:
            self._tm.abort_all(reason)
            await self._tm.close()
        await asyncio.to_thread(self.runtime.shutdown, clean=self.stop_clean)

    def _on_cluster_stop(self, reason: str, clean: bool) -> None:
        """From a coordinator thread: the cluster stopped or failed."""
        self._loop.call_soon_threadsafe(self._stop, reason, clean)

    def _stop(self, reason: str, clean: bool) -> None:
        if self._stopped.is_set():
            return
        self.stop_reason = f"cluster {'stop' if clean else 'failure'}: {reason}"
        self.stop_clean = clean
        if self._tm is not None:
            self._tm.abort_all(self.stop_reason)
        self._stopped.set()

    def _api(self) -> TokenizerManager:
        if self._tm is None:
            raise ServiceUnavailable(f"node {self.args.parallel.node_rank} runs ranks only: requests go to node 0")
        return self._tm


class Engine:
    """The synchronous API: an AsyncEngine on an event loop in a background thread."""

    def __init__(self, model_path: str | None = None, **server_args: Any) -> None:
        """`server_args`: ServerArgs fields by name (device="cpu", max_total_tokens=4096,
        chunked_prefill_size=64, disable_radix_cache=True, ...). Raises ServerArgsError for bad
        values and StartupError (a RuntimeError) if the node cannot start."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="meshserve-engine", daemon=True)
        self._thread.start()
        try:
            self.engine = self._run(AsyncEngine.create(model_path, **server_args))
        except BaseException:
            self._stop_loop()
            raise
        self.args = self.engine.args
        self.model_config = self.engine.model_config

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: SamplingDict | list[SamplingDict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """AsyncEngine.complete: one prompt (a dict, or a list of n dicts when n > 1) or a batch
        (a list with one dict per prompt and sample). `sampling_params` may be one dict for all
        prompts or one per prompt; SGLang's names (max_new_tokens, temperature, stop, ...).
        Raises InvalidRequest (a ValueError) for a bad request."""
        return self._run(self.engine.complete(prompt, sampling_params, input_ids))

    def shutdown(self) -> None:
        """Stop the scheduler processes and the background loop. Idempotent."""
        if self._loop.is_running():
            self._run(self.engine.shutdown())
            self._stop_loop()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
