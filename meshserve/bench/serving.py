"""Online serving benchmark: a load generator for meshserve (and any SGLang/vLLM/OpenAI server).

Flags follow SGLang's ``bench_serving`` so existing command lines carry over::

    python -m meshserve.bench_serving --backend meshserve --port 30000 \\
        --dataset-name random-ids --random-input-len 1024 --random-output-len 1024 \\
        --random-range-ratio 1.0 --num-prompts 200 --max-concurrency 32

Conventions, stated in the report as well because they differ between tools:

* ``--random-range-ratio`` uses SGLang's meaning: lengths uniform in
  ``[max(1, int(LEN * RATIO)), LEN]`` (0.0 -> U[1, LEN]; 1.0 -> exactly LEN).
* Output token throughput = generated tokens / benchmark wall time (input tokens excluded).
* ``ignore_eos`` is on by default: random prompts would otherwise stop at arbitrary points.
* A failed request is counted, and its error kept; it never disappears from the totals.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
import numpy as np

from meshserve.bench.datasets import (
    DATASET_NAMES,
    RANGE_RATIO_HELP,
    BenchRequest,
    TokenizerLike,
    generate_requests,
)

# Backend name -> API route. meshserve and sglang share the native /generate API.
BACKEND_ROUTES: dict[str, str] = {
    "meshserve": "/generate",
    "sglang": "/generate",
    "vllm": "/v1/completions",
    "openai": "/v1/completions",
    "openai-chat": "/v1/chat/completions",
}
NATIVE_BACKENDS = frozenset({"meshserve", "sglang"})

# Long generations under heavy load can legitimately take hours; the per-request timeout is
# only a guard against a hung server, not a latency budget.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=6 * 3600)

SSE_DONE = "[DONE]"


# --------------------------------------------------------------------------- SSE parsing


class SSEParser:
    """Incremental parser for ``text/event-stream`` bodies that yields each ``data:`` payload.

    Network reads split lines anywhere, so bytes are buffered until a newline. Every
    ``data:`` line is treated as one payload (the servers we target send one JSON object per
    event); blank lines, comments (``:``) and other fields (``event:``, ``id:``) are skipped.
    A long line is fine: there is no line-length limit, unlike aiohttp's ``readline``, which
    refuses lines over 128 KiB (a native chunk carries the whole text so far).
    """

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return [p for p in map(_sse_payload, lines) if p is not None]

    def close(self) -> list[str]:
        """Payload of a final line that had no trailing newline, if any."""
        rest, self._buffer = self._buffer, b""
        payload = _sse_payload(rest)
        return [] if payload is None else [payload]


def _sse_payload(line: bytes) -> str | None:
    text = line.decode("utf-8").rstrip("\r")
    if not text.startswith("data:"):
        return None
    payload = text[len("data:"):]
    # The spec strips exactly one leading space after the colon.
    return payload[1:] if payload.startswith(" ") else payload


def parse_sse(body: bytes | Sequence[bytes]) -> list[str]:
    """All ``data:`` payloads of a complete SSE body (or of a sequence of raw reads)."""
    parser = SSEParser()
    chunks = [body] if isinstance(body, bytes) else body
    payloads: list[str] = []
    for chunk in chunks:
        payloads.extend(parser.feed(chunk))
    payloads.extend(parser.close())
    return payloads


# --------------------------------------------------------------------------- one request


@dataclass
class RequestFuncInput:
    api_url: str
    backend: str
    model: str | None
    request: BenchRequest
    use_input_ids: bool  # native API only: send token ids instead of text
    stream: bool
    ignore_eos: bool
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RequestFuncOutput:
    """What one request produced. Times are in seconds (``time.perf_counter``)."""

    success: bool = False
    error: str = ""
    prompt_len: int = 0  # server-reported when it reports it, else the dataset's count
    output_len: int | None = None  # server-reported; filled from the text when missing
    expected_output_len: int = 0
    cached_tokens: int = 0
    start_time: float = 0.0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    generated_text: str = ""
    finish_reason: str | None = None


def token_timings(start: float, arrivals: Sequence[float], end: float) -> tuple[float, list[float]]:
    """TTFT and inter-token latencies from the times chunks carrying new tokens arrived.

    A chunk may carry several tokens; it still counts as one arrival (the client cannot see
    finer). With no token-carrying chunk (non-streaming), the first token is the whole reply.
    """
    if not arrivals:
        return end - start, []
    ttft = arrivals[0] - start
    itl = [b - a for a, b in zip(arrivals, arrivals[1:])]
    return ttft, itl


@dataclass
class _StreamState:
    """Accumulates one response's chunks; backend-specific ``absorb`` functions update it."""

    text: str = ""
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None


def _absorb_native(state: _StreamState, chunk: dict[str, Any]) -> bool:
    """One ``/generate`` chunk (cumulative text and counts). Returns: carried new tokens."""
    if "error" in chunk:
        state.error = f"server error: {chunk['error']}"
        return False
    meta = chunk.get("meta_info") or {}
    count = meta.get("completion_tokens")
    if count is None and "output_ids" in chunk:
        count = len(chunk["output_ids"])
    new_tokens = count is not None and count > (state.completion_tokens or 0)
    if count is not None:
        state.completion_tokens = int(count)
    if "text" in chunk:
        state.text = chunk["text"]
    if meta.get("prompt_tokens") is not None:
        state.prompt_tokens = int(meta["prompt_tokens"])
    state.cached_tokens = int(meta.get("cached_tokens") or 0)
    finish = meta.get("finish_reason")
    if isinstance(finish, dict):
        state.finish_reason = finish.get("type")
        if finish.get("type") == "abort":
            state.error = f"request aborted by the server: {finish.get('message', finish)}"
    elif finish is not None:
        state.finish_reason = str(finish)
    return new_tokens


def _absorb_usage(state: _StreamState, chunk: dict[str, Any]) -> None:
    usage = chunk.get("usage")
    if not usage:
        return
    if usage.get("completion_tokens") is not None:
        state.completion_tokens = int(usage["completion_tokens"])
    if usage.get("prompt_tokens") is not None:
        state.prompt_tokens = int(usage["prompt_tokens"])
    details = usage.get("prompt_tokens_details") or {}
    state.cached_tokens = int(details.get("cached_tokens") or 0)


def _absorb_openai(state: _StreamState, chunk: dict[str, Any], chat: bool) -> bool:
    """One OpenAI (chat) completion chunk, or a whole non-streamed reply.

    OpenAI chunks carry text, not token counts, so a chunk with non-empty text marks an
    arrival; the token total comes from the final ``usage`` chunk.
    """
    if "error" in chunk:
        state.error = f"server error: {chunk['error']}"
        return False
    _absorb_usage(state, chunk)
    choices = chunk.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    if chat:
        # Streams carry "delta"; a non-streamed reply carries "message".
        message = choice.get("delta") or choice.get("message") or {}
        piece = (message.get("reasoning_content") or "") + (message.get("content") or "")
    else:
        piece = choice.get("text") or ""
    if choice.get("finish_reason"):
        state.finish_reason = str(choice["finish_reason"])
        if state.finish_reason == "abort":
            state.error = "request aborted by the server"
    state.text += piece
    return bool(piece)


def _absorb_fn(backend: str) -> Callable[[_StreamState, dict[str, Any]], bool]:
    if backend in NATIVE_BACKENDS:
        return _absorb_native
    chat = backend == "openai-chat"
    return lambda state, chunk: _absorb_openai(state, chunk, chat)


def build_payload(inp: RequestFuncInput) -> dict[str, Any]:
    """Request body for ``inp.backend``; greedy decoding so runs are repeatable."""
    req = inp.request
    if inp.backend in NATIVE_BACKENDS:
        payload: dict[str, Any] = {
            "sampling_params": {
                "max_new_tokens": req.output_len,
                "temperature": 0.0,
                "ignore_eos": inp.ignore_eos,
            },
            "stream": inp.stream,
        }
        if inp.use_input_ids:
            payload["input_ids"] = req.input_ids
        else:
            payload["text"] = req.prompt
        return payload
    payload = {
        "model": inp.model,
        "max_tokens": req.output_len,
        "temperature": 0.0,
        "stream": inp.stream,
        # Not in the OpenAI spec; SGLang, vLLM and meshserve accept it as an extra field.
        "ignore_eos": inp.ignore_eos,
    }
    if inp.stream:
        payload["stream_options"] = {"include_usage": True}
    if inp.backend == "openai-chat":
        payload["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        payload["prompt"] = req.prompt
    return payload


async def send_request(session: aiohttp.ClientSession, inp: RequestFuncInput) -> RequestFuncOutput:
    """Send one request and time it. Never raises: failures come back with ``error`` set."""
    out = RequestFuncOutput(prompt_len=inp.request.prompt_len, expected_output_len=inp.request.output_len)
    state = _StreamState()
    absorb = _absorb_fn(inp.backend)
    arrivals: list[float] = []
    start = time.perf_counter()
    out.start_time = start
    try:
        async with session.post(inp.api_url, json=build_payload(inp), headers=inp.headers) as resp:
            if resp.status != 200:
                body = await resp.text()
                # One line per error, so the report can group identical failures.
                out.error = f"HTTP {resp.status}: {' '.join(body.split())[:500]}"
                out.latency = time.perf_counter() - start
                return out
            if inp.stream:
                parser = SSEParser()
                done = False
                async for raw in resp.content.iter_any():
                    now = time.perf_counter()  # one read, one arrival time for all it holds
                    for payload in parser.feed(raw):
                        if payload == SSE_DONE:
                            done = True
                            break
                        if absorb(state, json.loads(payload)):
                            arrivals.append(now)
                    if done or state.error:
                        break
                if not done and not state.error:
                    for payload in parser.close():
                        if payload == SSE_DONE:
                            done = True
                        elif absorb(state, json.loads(payload)):
                            arrivals.append(time.perf_counter())
                # A stream cut short (server died, proxy timeout) must not pass as a success.
                if not done and not state.error and state.finish_reason is None:
                    state.error = "stream ended without [DONE] or a finish reason"
            else:
                reply = await resp.json(content_type=None)
                if absorb(state, reply):
                    arrivals.append(time.perf_counter())
        end = time.perf_counter()
    except Exception as exc:  # noqa: BLE001 - any failure is a failed request, recorded
        out.error = f"{type(exc).__name__}: {exc}"
        out.latency = time.perf_counter() - start
        return out

    out.latency = end - start
    out.ttft, out.itl = token_timings(start, arrivals, end)
    out.generated_text = state.text
    out.finish_reason = state.finish_reason
    out.cached_tokens = state.cached_tokens
    out.output_len = state.completion_tokens
    if state.prompt_tokens is not None:
        out.prompt_len = state.prompt_tokens
    if state.error:
        out.error = state.error
    else:
        out.success = True
    return out


# --------------------------------------------------------------------------- metrics


@dataclass
class LatencyStats:
    """Milliseconds. NaN where there were no samples (e.g. ITL of one-token outputs)."""

    mean_ms: float
    median_ms: float
    p99_ms: float
    std_ms: float
    count: int


def summarize_ms(values_s: Sequence[float]) -> LatencyStats:
    """Mean/median/p99 of durations given in seconds, reported in milliseconds.

    p99 uses linear interpolation between order statistics (numpy's default), as SGLang does.
    """
    if len(values_s) == 0:
        nan = float("nan")
        return LatencyStats(nan, nan, nan, nan, 0)
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    return LatencyStats(
        mean_ms=float(arr.mean()),
        median_ms=float(np.median(arr)),
        p99_ms=float(np.percentile(arr, 99)),
        std_ms=float(arr.std()),
        count=int(arr.size),
    )


@dataclass
class BenchmarkMetrics:
    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    total_cached_tokens: int
    request_throughput: float  # successful requests / wall time
    input_throughput: float  # input tokens / wall time
    output_throughput: float  # generated tokens / wall time
    total_throughput: float  # (input + generated) tokens / wall time
    concurrency: float  # sum of E2E latencies / wall time: mean requests in flight
    ttft: LatencyStats
    itl: LatencyStats
    tpot: LatencyStats
    e2e: LatencyStats


def compute_metrics(outputs: Sequence[RequestFuncOutput], duration_s: float) -> BenchmarkMetrics:
    """Aggregate per-request results. Token totals and latencies count successes only;
    failures are counted in ``failed`` (their errors are reported separately)."""
    ok = [o for o in outputs if o.success]
    out_lens = [o.output_len or 0 for o in ok]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(out_lens)
    # TPOT excludes the first token, so it needs at least two.
    tpots = [(o.latency - o.ttft) / (n - 1) for o, n in zip(ok, out_lens) if n > 1]
    e2e = [o.latency for o in ok]
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: float("nan"))
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(outputs) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        total_cached_tokens=sum(o.cached_tokens for o in ok),
        request_throughput=per_s(len(ok)),
        input_throughput=per_s(total_in),
        output_throughput=per_s(total_out),
        total_throughput=per_s(total_in + total_out),
        concurrency=per_s(sum(e2e)),
        ttft=summarize_ms([o.ttft for o in ok]),
        itl=summarize_ms([t for o in ok for t in o.itl]),
        tpot=summarize_ms(tpots),
        e2e=summarize_ms(e2e),
    )


# --------------------------------------------------------------------------- the run


@dataclass
class BenchmarkConfig:
    backend: str
    base_url: str
    api_url: str
    model: str | None
    tokenizer: str
    dataset_name: str
    num_prompts: int
    random_input_len: int
    random_output_len: int
    random_range_ratio: float
    request_rate: float
    max_concurrency: int | None
    seed: int
    ignore_eos: bool
    stream: bool
    warmup_requests: int


@dataclass
class BenchmarkResult:
    config: BenchmarkConfig
    metrics: BenchmarkMetrics
    outputs: list[RequestFuncOutput]
    errors: dict[str, int]  # distinct error message -> count

    def to_json_dict(self) -> dict[str, Any]:
        ok = [o for o in self.outputs if o.success]
        return _json_safe(
            {
                "date": datetime.now(timezone.utc).isoformat(),
                "config": asdict(self.config),
                "metrics": asdict(self.metrics),
                "output_throughput_definition": "generated tokens / benchmark wall time",
                "range_ratio_semantics": "sglang: lengths uniform in [max(1, int(LEN*RATIO)), LEN]",
                "errors": self.errors,
                "input_lens": [o.prompt_len for o in ok],
                "output_lens": [o.output_len for o in ok],
                "ttfts_s": [o.ttft for o in ok],
                "e2e_latencies_s": [o.latency for o in ok],
                "itls_s": [o.itl for o in ok],
            }
        )


def _json_safe(obj: Any) -> Any:
    """Strict JSON has no NaN/Infinity: NaN ('no samples') becomes null, an infinite request
    rate the string "inf"."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, float) and math.isinf(obj):
        return "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def poisson_delays(n: int, request_rate: float, seed: int) -> list[float]:
    """Gaps before each request: 0 for an infinite rate, else exponential (Poisson arrivals)."""
    if math.isinf(request_rate):
        return [0.0] * n
    if request_rate <= 0:
        raise ValueError(f"--request-rate must be > 0, got {request_rate}")
    rng = np.random.default_rng(seed)
    return rng.exponential(1.0 / request_rate, size=n).tolist()


async def _arrivals(requests: Sequence[BenchRequest], delays: Sequence[float]) -> AsyncIterator[BenchRequest]:
    for req, delay in zip(requests, delays):
        if delay > 0:
            await asyncio.sleep(delay)
        yield req


def _make_input(config: BenchmarkConfig, req: BenchRequest, headers: dict[str, str]) -> RequestFuncInput:
    return RequestFuncInput(
        api_url=config.api_url,
        backend=config.backend,
        model=config.model,
        request=req,
        use_input_ids=config.dataset_name == "random-ids",
        stream=config.stream,
        ignore_eos=config.ignore_eos,
        headers=headers,
    )


async def benchmark(
    config: BenchmarkConfig,
    requests: Sequence[BenchRequest],
    warmup: Sequence[BenchRequest],
    tokenizer: TokenizerLike | None,
    headers: dict[str, str],
    show_progress: bool = True,
) -> BenchmarkResult:
    """Warm up, then send ``requests`` at the configured rate/concurrency and measure."""
    # limit=0: no connection cap in aiohttp itself (its default is 100, which would silently
    # cap concurrency); --max-concurrency is enforced by the semaphore below instead.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT) as session:
        if warmup:
            results = await asyncio.gather(*(send_request(session, _make_input(config, r, headers)) for r in warmup))
            failed = [r.error for r in results if not r.success]
            if failed:
                raise RuntimeError(f"warm-up request failed, not benchmarking: {failed[0]}")

        semaphore = asyncio.Semaphore(config.max_concurrency) if config.max_concurrency else None
        pbar = None
        if show_progress:
            from tqdm.asyncio import tqdm

            pbar = tqdm(total=len(requests))

        async def one(req: BenchRequest) -> RequestFuncOutput:
            if semaphore is None:
                result = await send_request(session, _make_input(config, req, headers))
            else:
                async with semaphore:
                    result = await send_request(session, _make_input(config, req, headers))
            if pbar is not None:
                pbar.update(1)
            return result

        delays = poisson_delays(len(requests), config.request_rate, config.seed)
        start = time.perf_counter()
        tasks: list[asyncio.Task[RequestFuncOutput]] = []
        async for req in _arrivals(requests, delays):
            tasks.append(asyncio.create_task(one(req)))
        outputs = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        if pbar is not None:
            pbar.close()

    # Servers that do not report a token count (no usage chunk) are measured by re-encoding
    # the text; less exact, but better than counting nothing.
    for o in outputs:
        if o.success and o.output_len is None:
            o.output_len = _count_tokens(tokenizer, o.generated_text)
    errors = Counter(o.error for o in outputs if not o.success)
    return BenchmarkResult(config, compute_metrics(outputs, duration), outputs, dict(errors.most_common()))


def _count_tokens(tokenizer: TokenizerLike | None, text: str) -> int:
    if tokenizer is None:
        return 0
    try:  # a HF tokenizer would otherwise add BOS, which was never generated
        return len(tokenizer.encode(text, add_special_tokens=False))  # type: ignore[call-arg]
    except TypeError:
        return len(tokenizer.encode(text))


# --------------------------------------------------------------------------- report


def _fmt(value: float, digits: int = 2) -> str:
    return "n/a" if isinstance(value, float) and math.isnan(value) else f"{value:.{digits}f}"


def format_header(config: BenchmarkConfig, requests: Sequence[BenchRequest]) -> str:
    in_lens = [r.prompt_len for r in requests]
    out_lens = [r.output_len for r in requests]
    ratio = config.random_range_ratio
    lines = [
        f"Backend: {config.backend}   URL: {config.api_url}   model: {config.model}",
        f"Dataset: {config.dataset_name}, {config.num_prompts} prompts, seed {config.seed}, "
        f"ignore_eos={config.ignore_eos}, stream={config.stream}",
        f"Random range ratio: {ratio} (SGLang semantics: lengths uniform in "
        f"[max(1, int(LEN*{ratio})), LEN])",
        f"  input len  LEN={config.random_input_len}: prompts have mean {np.mean(in_lens):.1f}, "
        f"min {min(in_lens)}, max {max(in_lens)}",
        f"  output len LEN={config.random_output_len}: requests ask for mean {np.mean(out_lens):.1f}, "
        f"min {min(out_lens)}, max {max(out_lens)}",
    ]
    return "\n".join(lines)


def format_report(result: BenchmarkResult) -> str:
    c, m = result.config, result.metrics
    width = 50
    rows: list[str] = [" Serving Benchmark Result ".center(width, "=")]

    def row(name: str, value: Any) -> None:
        rows.append(f"{name:<40} {value:<10}")

    def section(title: str, stats: LatencyStats, short: str) -> None:
        rows.append(f" {title} ".center(width, "-"))
        row(f"Mean {short} (ms):", _fmt(stats.mean_ms))
        row(f"Median {short} (ms):", _fmt(stats.median_ms))
        row(f"P99 {short} (ms):", _fmt(stats.p99_ms))

    row("Backend:", c.backend)
    row("Traffic request rate:", c.request_rate)
    row("Max request concurrency:", c.max_concurrency if c.max_concurrency else "not set")
    row("Random range ratio:", f"{c.random_range_ratio} (U[max(1,int(LEN*r)),LEN])")
    row("Successful requests:", m.completed)
    row("Failed requests:", m.failed)
    row("Benchmark duration (s):", _fmt(m.duration_s))
    row("Total input tokens:", m.total_input_tokens)
    row("Total generated tokens:", m.total_output_tokens)
    row("Cached input tokens (server-reported):", m.total_cached_tokens)
    row("Request throughput (req/s):", _fmt(m.request_throughput))
    row("Input token throughput (tok/s):", _fmt(m.input_throughput))
    row("Output token throughput (tok/s):", _fmt(m.output_throughput))
    rows.append("  (output tokens / wall time, input excluded)")
    row("Total token throughput (tok/s):", _fmt(m.total_throughput))
    row("Concurrency:", _fmt(m.concurrency))
    section("End-to-End Latency", m.e2e, "E2E Latency")
    section("Time to First Token", m.ttft, "TTFT")
    section("Time per Output Token (excl. 1st token)", m.tpot, "TPOT")
    section("Inter-Token Latency", m.itl, "ITL")
    rows.append("=" * width)
    if result.errors:
        rows.append(f"Errors ({m.failed} failed requests):")
        for message, count in list(result.errors.items())[:10]:
            rows.append(f"  {count} x {message}")
    return "\n".join(rows)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m meshserve.bench_serving",
        description="Benchmark an LLM server's online serving throughput and latency "
        "(flags follow SGLang's bench_serving).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--backend",
        choices=sorted(BACKEND_ROUTES),
        default="meshserve",
        help="meshserve/sglang: native /generate; vllm/openai: /v1/completions; "
        "openai-chat: /v1/chat/completions (all streaming unless --disable-stream).",
    )
    p.add_argument("--base-url", default=None, help="Server URL, e.g. http://10.0.0.1:30000; overrides --host/--port.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model", default=None, help="Model name sent to OpenAI routes (default: first id of GET /v1/models).")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="Local HF tokenizer directory (default: the server's tokenizer_path from GET /get_model_info, "
        "which must exist on this machine). Never downloaded.",
    )
    p.add_argument(
        "--dataset-name",
        choices=DATASET_NAMES,
        default="random-ids",
        help="random-ids: prompts are exact random token ids (sent as input_ids to /generate; decoded to text "
        "for OpenAI routes). random: random ids decoded to text, re-encoded to count the true input length.",
    )
    p.add_argument("--random-input-len", type=int, default=1024, help="Input length LEN. " + RANGE_RATIO_HELP)
    p.add_argument("--random-output-len", type=int, default=1024, help="Output length LEN. " + RANGE_RATIO_HELP)
    p.add_argument("--random-range-ratio", type=float, default=0.0, help=RANGE_RATIO_HELP)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight at once (default: no cap).")
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Requests per second, Poisson arrivals; inf sends all at once.",
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--disable-ignore-eos",
        action="store_true",
        help="Let requests stop at EOS (ignore_eos is on by default: random prompts would stop arbitrarily).",
    )
    p.add_argument("--disable-stream", action="store_true", help="Non-streaming requests (TTFT then equals E2E latency).")
    p.add_argument("--output-file", default=None, help="Append one JSON line with config, metrics and per-request data.")
    p.add_argument(
        "--warmup-requests",
        type=int,
        default=1,
        help="Untimed requests sent first (drawn with a different seed, so they do not prime the prefix cache "
        "with benchmark prompts).",
    )
    p.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
    return p


def _auth_headers() -> dict[str, str]:
    # Same convention as SGLang's bench_serving: a key in OPENAI_API_KEY is sent as a bearer token.
    key = os.environ.get("OPENAI_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


async def _get_json(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> Any:
    async with session.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=30)) as resp:
        if resp.status != 200:
            raise RuntimeError(f"GET {url} -> HTTP {resp.status}: {(await resp.text())[:300]}")
        return await resp.json(content_type=None)


async def resolve_server_info(base_url: str, headers: dict[str, str], need_model: bool, need_tokenizer: bool) -> tuple[str | None, str | None]:
    """Ask the server for its model id and tokenizer path (only what the flags left open)."""
    model: str | None = None
    tokenizer_path: str | None = None
    async with aiohttp.ClientSession() as session:
        if need_model:
            try:
                data = await _get_json(session, base_url + "/v1/models", headers)
                model = data["data"][0]["id"]
            except Exception as exc:  # noqa: BLE001 - reported with context below
                raise RuntimeError(f"cannot get the model id from {base_url}/v1/models ({exc}); pass --model") from exc
        if need_tokenizer:
            try:
                info = await _get_json(session, base_url + "/get_model_info", headers)
                tokenizer_path = info.get("tokenizer_path") or info["model_path"]
            except Exception as exc:  # noqa: BLE001
                raise RuntimeError(
                    f"cannot get the tokenizer path from {base_url}/get_model_info ({exc}); pass --tokenizer DIR"
                ) from exc
    return model, tokenizer_path


def load_tokenizer(path: str) -> Any:
    """A local HF tokenizer; nothing is downloaded."""
    if not os.path.isdir(path):
        raise RuntimeError(
            f"tokenizer directory {path!r} does not exist on this machine (a server-reported path is only "
            "valid where the server runs); pass --tokenizer with a local copy"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _raise_nofile_limit() -> None:
    """Each in-flight request holds a socket; 1000 at once exceed the common 1024-fd soft limit."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = 65535 if hard == resource.RLIM_INFINITY else min(hard, 65535)
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ImportError, ValueError, OSError):
        pass  # best effort (e.g. not permitted); the run may still fit


async def run_benchmark_async(args: argparse.Namespace) -> BenchmarkResult:
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = _auth_headers()
    native = args.backend in NATIVE_BACKENDS

    # The native API needs no model name; ask for it anyway for the report, but do not fail.
    model, tokenizer_path = args.model, args.tokenizer
    if model is None:
        try:
            model, _ = await resolve_server_info(base_url, headers, need_model=True, need_tokenizer=False)
        except RuntimeError:
            if not native:
                raise
    if tokenizer_path is None:
        _, tokenizer_path = await resolve_server_info(base_url, headers, need_model=False, need_tokenizer=True)
    assert tokenizer_path is not None
    tokenizer = load_tokenizer(tokenizer_path)

    config = BenchmarkConfig(
        backend=args.backend,
        base_url=base_url,
        api_url=base_url + BACKEND_ROUTES[args.backend],
        model=model,
        tokenizer=tokenizer_path,
        dataset_name=args.dataset_name,
        num_prompts=args.num_prompts,
        random_input_len=args.random_input_len,
        random_output_len=args.random_output_len,
        random_range_ratio=args.random_range_ratio,
        request_rate=args.request_rate,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        ignore_eos=not args.disable_ignore_eos,
        stream=not args.disable_stream,
        warmup_requests=args.warmup_requests,
    )
    common = dict(
        dataset_name=args.dataset_name,
        input_len=args.random_input_len,
        output_len=args.random_output_len,
        range_ratio=args.random_range_ratio,
    )
    requests = generate_requests(tokenizer, num_prompts=args.num_prompts, seed=args.seed, **common)
    # A different seed keeps warm-up prompts out of the benchmark's prefix-cache picture.
    warmup = (
        generate_requests(tokenizer, num_prompts=args.warmup_requests, seed=args.seed + 1_000_003, **common)
        if args.warmup_requests > 0
        else []
    )
    print(format_header(config, requests), flush=True)

    result = await benchmark(config, requests, warmup, tokenizer, headers, show_progress=not args.disable_tqdm)
    short = sum(1 for o in result.outputs if o.success and config.ignore_eos and (o.output_len or 0) < o.expected_output_len)
    print(format_report(result), flush=True)
    if short:
        print(f"WARNING: {short} successful requests produced fewer tokens than requested despite ignore_eos.")
    if args.output_file:
        with open(args.output_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(result.to_json_dict(), allow_nan=False) + "\n")
    return result


def run_benchmark(args: argparse.Namespace) -> BenchmarkResult:
    _raise_nofile_limit()
    return asyncio.run(run_benchmark_async(args))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = run_benchmark(args)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # Non-zero when nothing succeeded, so scripts notice a broken server.
    return 0 if result.metrics.completed > 0 else 1
