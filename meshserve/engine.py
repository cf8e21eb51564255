"""meshserve.Engine: the offline, in-process API over the same scheduler processes as the server.

    with meshserve.Engine(device="cpu", max_total_tokens=4096) as engine:
        out = engine.generate("The capital of France is", {"max_new_tokens": 16, "temperature": 0})
        print(out["text"])

A TokenizerManager runs on an asyncio loop in a background thread; `generate` submits every
prompt of a call at once, so they batch in the scheduler. Results have the shape of the native
/generate response.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import types
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

from meshserve.cluster.launcher import launch_schedulers
from meshserve.cluster.node import ClusterNode
from meshserve.config.model_config import ModelConfig
from meshserve.config.server_args import ServerArgs
from meshserve.server.generation import GenerateRequest, SequenceResult
from meshserve.server.native_api import engine_requests, native_response
from meshserve.server.tokenizer_manager import TokenizerManager, load_tokenizer

T = TypeVar("T")

SamplingDict = dict[str, Any]


@contextlib.contextmanager
def _spawn_without_main() -> Iterator[None]:
    """Start `spawn` children without the caller's `__main__`.

    multiprocessing's spawn re-imports the parent's main script (or `-m` module) in each child,
    so a plain script that builds an Engine at top level, without an `if __name__ ==
    "__main__":` guard, would build another Engine inside the child and fail. The scheduler's
    entry point and arguments all live in meshserve, so the child needs nothing from
    `__main__`: while the children start, `__main__` is a bare module with no file and no spec,
    which spawn skips. The user's module object itself is never touched."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class Engine:
    def __init__(self, model_path: str | None = None, **server_args: Any) -> None:
        """`server_args`: ServerArgs fields by name (device="cpu", max_total_tokens=4096,
        chunked_prefill_size=64, disable_radix_cache=True, ...). Raises ServerArgsError for bad
        values and RuntimeError if the scheduler fails to start."""
        self.args = ServerArgs().replace(model_path=model_path, **server_args).validate()
        self.model_config = ModelConfig.from_server_args(self.args)
        if self.args.parallel.nnodes > 1:
            raise ValueError("meshserve.Engine runs on one node; serve several nodes with launch_server")
        tokenizer = load_tokenizer(self.model_config.tokenizer_path)
        self._cluster = ClusterNode(self.args, self.model_config)  # tp > 1: the local rendezvous store
        self._cluster.start()
        with _spawn_without_main():
            self._processes = launch_schedulers(self.args, self._cluster.rendezvous)
        assert self._processes.endpoints is not None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="meshserve-engine", daemon=True)
        self._thread.start()
        self._tm = TokenizerManager(
            tokenizer,
            endpoints=self._processes.endpoints,
            scheduler_dead=self._processes.dead,
            load_balance_method=self.args.parallel.load_balance_method,
        )
        try:
            self._run(self._tm.start())
        except Exception as err:
            self.shutdown()
            raise RuntimeError(f"the scheduler failed to start: {err}") from None

    def generate(
        self,
        prompt: str | list[str] | None = None,
        sampling_params: SamplingDict | list[SamplingDict] | None = None,
        input_ids: list[int] | list[list[int]] | None = None,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Generate for one prompt (a dict, or a list of n dicts when n > 1) or a batch (a list
        with one dict per prompt and sample). `sampling_params` may be one dict for all prompts
        or one per prompt; SGLang's names (max_new_tokens, temperature, stop, ...).
        Raises InvalidRequest (a ValueError) for a bad request."""
        requests, batch = engine_requests(prompt, sampling_params, input_ids)
        results = self._run(self._collect(requests))
        bodies = [[native_response(r) for r in per_prompt] for per_prompt in results]
        if batch:
            return [body for per_prompt in bodies for body in per_prompt]
        return bodies[0][0] if len(bodies[0]) == 1 else bodies[0]

    def shutdown(self) -> None:
        """Stop the scheduler processes and the background loop. Idempotent."""
        if self._loop.is_running():
            self._run(self._tm.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
        self._processes.shutdown()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    async def _collect(self, requests: list[GenerateRequest]) -> list[list[SequenceResult]]:
        # Tokenize through the TokenizerManager (its loop, its tokenize thread), never on the
        # caller's thread: it decides which one thread may run a large encode.
        return await self._tm.collect_many([await self._tm.prepare(r) for r in requests])

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()
