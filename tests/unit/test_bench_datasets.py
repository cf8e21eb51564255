"""Benchmark client: prompt generation, SSE parsing, metrics arithmetic, and one pass of the
request loop against an in-process fake server (no meshserve server, no model)."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from meshserve.bench.datasets import BenchRequest, generate_requests, sample_lengths
from meshserve.bench.serving import (
    BACKEND_ROUTES,
    SSEParser,
    BenchmarkConfig,
    RequestFuncOutput,
    benchmark,
    build_parser,
    compute_metrics,
    parse_sse,
    poisson_delays,
    summarize_ms,
    token_timings,
)


class StubTokenizer:
    """Minimal tokenizer: token i <-> the word ``w{i}``. Ids 0 and 1 are special."""

    vocab_size = 50
    all_special_ids = [0, 1]

    def encode(self, text: str) -> list[int]:
        return [int(w[1:]) for w in text.split()]

    def decode(self, token_ids: Sequence[int]) -> str:
        return " ".join(f"w{i}" for i in token_ids)


@pytest.fixture(scope="module")
def hf_tokenizer():
    """A real (tiny) HF fast tokenizer, byte-level BPE trained in-process: decode/re-encode of
    random ids does not round-trip, which is what the ``random`` dataset has to cope with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<eos>"], show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "serving engines batch requests"] * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


# --------------------------------------------------------------------------- datasets


def _gen(tokenizer, name="random-ids", n=200, inp=64, out=32, ratio=0.0, seed=1) -> list[BenchRequest]:
    return generate_requests(tokenizer, name, n, inp, out, ratio, seed)


@pytest.mark.parametrize("name", ["random-ids", "random"])
def test_deterministic_for_seed(hf_tokenizer, name):
    a = _gen(hf_tokenizer, name, n=20, seed=7)
    assert a == _gen(hf_tokenizer, name, n=20, seed=7)
    assert a != _gen(hf_tokenizer, name, n=20, seed=8)


def test_range_ratio_zero_is_uniform_from_one():
    lens = sample_lengths(np.random.default_rng(0), 10, 0.0, 5000)
    assert lens.min() == 1 and lens.max() == 10
    assert set(lens.tolist()) == set(range(1, 11))
    assert abs(lens.mean() - 5.5) < 0.2  # about half of LEN, as SGLang's default implies


def test_range_ratio_one_is_exact():
    reqs = _gen(StubTokenizer(), ratio=1.0, inp=64, out=32)
    assert {r.prompt_len for r in reqs} == {64}
    assert {r.output_len for r in reqs} == {32}


def test_range_ratio_half_bounds():
    reqs = _gen(StubTokenizer(), n=500, ratio=0.5, inp=64, out=33)
    assert min(r.prompt_len for r in reqs) >= 32 and max(r.prompt_len for r in reqs) <= 64
    assert min(r.output_len for r in reqs) >= 16 and max(r.output_len for r in reqs) <= 33  # int(16.5)
    with pytest.raises(ValueError):
        sample_lengths(np.random.default_rng(0), 10, 1.5, 1)


def test_random_ids_exact_length_and_no_special_tokens(hf_tokenizer):
    specials = set(hf_tokenizer.all_special_ids)
    reqs = _gen(hf_tokenizer, "random-ids", n=100, inp=40, ratio=0.0)
    rng = np.random.default_rng(1)
    expected = sample_lengths(rng, 40, 0.0, 100).tolist()
    assert [r.prompt_len for r in reqs] == expected
    for r in reqs:
        assert len(r.input_ids) == r.prompt_len
        assert not specials & set(r.input_ids)
        assert all(0 <= i < hf_tokenizer.vocab_size for i in r.input_ids)
        assert r.prompt == hf_tokenizer.decode(r.input_ids)


def test_random_text_counts_reencoded_length(hf_tokenizer):
    for r in _gen(hf_tokenizer, "random", n=30, inp=40):
        assert r.input_ids == hf_tokenizer.encode(r.prompt)
        assert r.prompt_len == len(r.input_ids)


def test_same_prompts_with_stub_tokenizer():
    reqs = _gen(StubTokenizer(), "random", n=10)
    assert all(r.input_ids and 0 not in r.input_ids and 1 not in r.input_ids for r in reqs)
    assert reqs == _gen(StubTokenizer(), "random-ids", n=10)  # stub round-trips exactly


# --------------------------------------------------------------------------- SSE


def test_sse_parser_handles_split_reads_crlf_comments_and_done():
    body = b': keep-alive\r\n\r\ndata: {"a": 1}\r\n\r\nevent: x\ndata:{"b": "\xc3\xa9"}\n\ndata: [DONE]\n\n'
    assert parse_sse(body) == ['{"a": 1}', '{"b": "\u00e9"}', "[DONE]"]
    # Byte by byte (splitting the UTF-8 character too) gives the same payloads.
    assert parse_sse([body[i : i + 1] for i in range(len(body))]) == parse_sse(body)


def test_sse_parser_final_line_without_newline_and_long_line():
    parser = SSEParser()
    big = json.dumps({"text": "x" * 300_000})
    assert parser.feed(b"data: " + big.encode()) == []
    assert parser.close() == [big]


# --------------------------------------------------------------------------- metrics


def test_token_timings():
    ttft, itl = token_timings(10.0, [10.5, 10.6, 10.9], 11.0)
    assert ttft == pytest.approx(0.5)
    assert itl == pytest.approx([0.1, 0.3])
    assert token_timings(10.0, [], 12.0) == (2.0, [])  # non-streaming: first token = whole reply


def test_summarize_ms_percentiles():
    stats = summarize_ms([i / 1000 for i in range(1, 101)])  # 1..100 ms
    assert stats.mean_ms == pytest.approx(50.5)
    assert stats.median_ms == pytest.approx(50.5)
    assert stats.p99_ms == pytest.approx(99.01)  # linear interpolation between 99 and 100
    assert stats.count == 100
    assert math.isnan(summarize_ms([]).mean_ms)


def test_compute_metrics_arithmetic():
    outs = [
        RequestFuncOutput(success=True, prompt_len=100, output_len=11, ttft=0.2, itl=[0.1] * 10, latency=1.2),
        RequestFuncOutput(success=True, prompt_len=50, output_len=1, ttft=0.3, itl=[], latency=0.3),
        RequestFuncOutput(success=False, error="HTTP 500: boom", prompt_len=999, latency=0.01),
    ]
    m = compute_metrics(outs, duration_s=2.0)
    assert (m.completed, m.failed) == (2, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (150, 12)
    assert m.output_throughput == pytest.approx(6.0)  # 12 tokens / 2 s wall time
    assert m.total_throughput == pytest.approx(81.0)
    assert m.request_throughput == pytest.approx(1.0)
    assert m.concurrency == pytest.approx(0.75)  # (1.2 + 0.3) / 2
    assert m.ttft.mean_ms == pytest.approx(250.0)
    assert m.tpot.mean_ms == pytest.approx(100.0)  # (1.2 - 0.2) / 10; one-token output excluded
    assert m.tpot.count == 1
    assert m.itl.count == 10 and m.itl.median_ms == pytest.approx(100.0)


def test_poisson_delays():
    assert poisson_delays(3, float("inf"), 1) == [0.0, 0.0, 0.0]
    d = poisson_delays(20000, 4.0, 1)
    assert d == poisson_delays(20000, 4.0, 1)
    assert np.mean(d) == pytest.approx(0.25, rel=0.05)


def test_cli_defaults():
    args = build_parser().parse_args([])
    assert (args.backend, args.host, args.port, args.num_prompts, args.seed) == ("meshserve", "127.0.0.1", 30000, 1000, 1)
    assert args.random_range_ratio == 0.0 and math.isinf(args.request_rate)
    assert "uniformly from [max(1, int(LEN * RATIO)), LEN]" in " ".join(build_parser().format_help().split())


# --------------------------------------------------------------------------- request loop


def _fake_app() -> web.Application:
    """Speaks the native /generate and OpenAI streaming formats; prompts whose first id is 13
    (native) or text starting with 'w13' (OpenAI) get HTTP 500 so failures can be counted."""

    async def sse(request: web.Request, chunks: list[dict]) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.001)
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def generate(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        ids = body["input_ids"] if "input_ids" in body else [int(w[1:]) for w in body["text"].split()]
        if ids[0] == 13:
            return web.Response(status=500, text="boom")
        n = body["sampling_params"]["max_new_tokens"]
        chunks = [
            {
                "text": "t" * k,
                "output_ids": list(range(k)),
                "meta_info": {
                    "id": "x",
                    "prompt_tokens": len(ids),
                    "completion_tokens": k,
                    "cached_tokens": 0,
                    "finish_reason": {"type": "length", "length": n} if k == n else None,
                },
            }
            for k in range(1, n + 1)
        ]
        if not body["stream"]:
            return web.json_response(chunks[-1])
        return await sse(request, chunks)

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["ignore_eos"] is True and body["stream_options"] == {"include_usage": True}
        text = body["prompt"] if "prompt" in body else body["messages"][0]["content"]
        if text.startswith("w13 "):
            return web.Response(status=500, text="boom")
        n = body["max_tokens"]
        if "messages" in body:
            chunks = [{"choices": [{"delta": {"content": "y"}, "finish_reason": None}]} for _ in range(n)]
        else:
            chunks = [{"choices": [{"text": "y", "finish_reason": None}]} for _ in range(n)]
        chunks.append({"choices": [], "usage": {"prompt_tokens": len(text.split()), "completion_tokens": n}})
        return await sse(request, chunks)

    app = web.Application()
    app.router.add_post("/generate", generate)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", completions)
    return app


async def _run_against_fake(backend: str, stream: bool, requests: list[BenchRequest]):
    runner = web.AppRunner(_fake_app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}"
    try:
        config = BenchmarkConfig(
            backend=backend, base_url=base, api_url=base + BACKEND_ROUTES[backend], model="m", tokenizer="stub",
            dataset_name="random-ids", num_prompts=len(requests), random_input_len=8, random_output_len=5,
            random_range_ratio=0.0, request_rate=float("inf"), max_concurrency=2, seed=1, ignore_eos=True,
            stream=stream, warmup_requests=1,
        )
        return await benchmark(config, requests, requests[:1], StubTokenizer(), {}, show_progress=False)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "backend,stream", [("meshserve", True), ("meshserve", False), ("openai", True), ("openai-chat", True)]
)
def test_benchmark_against_fake_server(backend, stream):
    tok = StubTokenizer()
    reqs = [BenchRequest(tok.decode(ids), ids, len(ids), out) for ids, out in [([5, 6, 7], 5), ([8], 3), ([13, 2], 4)]]
    result = asyncio.run(_run_against_fake(backend, stream, reqs))
    m = result.metrics
    assert (m.completed, m.failed) == (2, 1)
    assert result.errors == {"HTTP 500: boom": 1}  # counted with its error, not dropped
    assert m.total_input_tokens == 4 and m.total_output_tokens == 8
    ok = [o for o in result.outputs if o.success]
    if stream:
        assert [len(o.itl) for o in ok] == [4, 2]  # one arrival per token-carrying chunk
    assert all(0 < o.ttft <= o.latency for o in ok)


def test_truncated_stream_is_a_failure():
    async def cut(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"text": "a", "meta_info": {"completion_tokens": 1, "finish_reason": null}}\n\n')
        return resp  # ends cleanly, but without [DONE] or a finish reason

    async def go():
        app = web.Application()
        app.router.add_post("/generate", cut)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            from meshserve.bench.serving import RequestFuncInput, send_request

            async with aiohttp.ClientSession() as session:
                inp = RequestFuncInput(f"http://127.0.0.1:{port}/generate", "meshserve", None,
                                       BenchRequest("w5", [5], 1, 4), True, True, True)
                return await send_request(session, inp)
        finally:
            await runner.cleanup()

    out = asyncio.run(go())
    assert not out.success and "without [DONE]" in out.error
