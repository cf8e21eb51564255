"""meshserve.AsyncEngine: streaming equals non-streaming equals transformers; abort (by rid, by
cancelling the consumer's task) frees the request in the scheduler; token-id input."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

import meshserve
from meshserve.server.generation import RequestAborted
from tests.hf_reference import hf_greedy

GREEDY = {"temperature": 0, "ignore_eos": True}
LONG = {**GREEDY, "max_new_tokens": 1500}  # far more steps than an abort takes to arrive


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engine(loop, tiny_qwen3_dir):
    engine = loop.run_until_complete(meshserve.AsyncEngine.create(
        str(tiny_qwen3_dir), device="cpu", max_total_tokens=4096, context_length=2048, chunked_prefill_size=64))
    yield engine
    loop.run_until_complete(engine.shutdown())


async def _stream(engine, **kwargs):
    outputs = []
    async for out in engine.generate(**kwargs):
        outputs.append(out)
    return outputs


async def _idle(engine) -> None:
    """The scheduler holds no request: flush_cache, which it refuses while any runs, succeeds."""
    for _ in range(100):
        if (await engine.tokenizer_manager.flush_cache()).success:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the scheduler still runs a request")


def test_stream_equals_complete_equals_transformers(loop, engine, tiny_qwen3_dir):
    tokenizer = engine.runtime.tokenizer
    prompt = "The capital of France is"
    ids = tokenizer.encode(prompt)
    expected = hf_greedy(tiny_qwen3_dir, [ids], 12)[0]

    by_text = loop.run_until_complete(_stream(engine, prompt=prompt, sampling_params={**GREEDY, "max_new_tokens": 12}))
    by_ids = loop.run_until_complete(_stream(engine, input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 12}))
    whole = loop.run_until_complete(engine.complete(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 12}))

    for stream in (by_text, by_ids):
        assert len(stream) > 1  # incremental, not one final chunk
        assert [t for out in stream for t in out.token_ids] == expected
        assert "".join(out.text for out in stream) == whole["text"]
        assert [out.finish for out in stream[:-1]] == [None] * (len(stream) - 1)
        last = stream[-1]
        assert last.finish is not None and last.finish.kind == "length"
        assert (last.prompt_tokens, last.completion_tokens) == (len(ids), 12)
    assert whole["output_ids"] == expected
    assert whole["text"] == tokenizer.decode(expected)


def test_abort_by_rid_frees_the_request(loop, engine, tiny_qwen3_dir):
    async def run() -> int:
        received = 0
        with pytest.raises(RequestAborted):
            async for out in engine.generate("Count with me:", LONG, rid="to-abort"):
                received += len(out.token_ids)
                if received >= 3:
                    assert engine.abort("to-abort")
        assert not engine.abort("to-abort")  # gone from the engine at once
        await _idle(engine)
        return received

    received = loop.run_until_complete(run())
    assert received < LONG["max_new_tokens"]
    assert engine.tokenizer_manager.num_in_flight == 0
    # The engine goes on serving, with the same answers.
    ids = engine.runtime.tokenizer.encode("Hello")
    out = loop.run_until_complete(engine.complete(input_ids=ids, sampling_params={**GREEDY, "max_new_tokens": 6}))
    assert out["output_ids"] == hf_greedy(tiny_qwen3_dir, [ids], 6)[0]


def test_cancelling_the_consumer_aborts(loop, engine):
    async def run() -> None:
        started = asyncio.Event()

        async def consume() -> None:
            async for _ in engine.generate(input_ids=[5, 6, 7, 8], sampling_params=LONG, rid="to-cancel"):
                started.set()

        task = asyncio.create_task(consume())
        await started.wait()
        assert engine.tokenizer_manager.num_in_flight == 1
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not engine.abort("to-cancel")  # nothing left to abort
        await _idle(engine)
        # The scheduler answered the abort (its output goes before the flush's): the rid is free
        # again, and a new request with it runs to the end.
        assert engine.tokenizer_manager.num_in_flight == 0
        outputs = await _stream(engine, input_ids=[5, 6, 7, 8], sampling_params={**GREEDY, "max_new_tokens": 4},
                                rid="to-cancel")
        assert sum(len(o.token_ids) for o in outputs) == 4

    loop.run_until_complete(run())


def test_bad_requests(loop, engine):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        loop.run_until_complete(_stream(engine, input_ids=[10**7], sampling_params={}))
    with pytest.raises(ValueError, match="one prompt"):
        loop.run_until_complete(_stream(engine, prompt=["a", "b"], sampling_params={}))
