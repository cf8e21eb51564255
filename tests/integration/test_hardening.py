"""Issue 10, items 4-7 on a real server process over real sockets: out-of-range numbers are
400s naming the field (streaming too), slow and malformed clients are answered or cut off
within the configured bounds, /health stays fast while a 1 MB prompt is tokenized, and model
directory code never runs, --trust-remote-code or not.

One server serves the module: a tiny Llama whose directory declares custom config and tokenizer
code (modules that would write a marker file when imported), started with --trust-remote-code
and short HTTP bounds so the slow-client cases take seconds.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from meshserve.config.model_config import ModelConfig, ModelConfigError
from meshserve.config.server_args import ServerArgs
from meshserve.server.tokenizer_manager import load_tokenizer
from tests.server_process import start_server

HEADER_TIMEOUT_S = 1.5
BODY_TIMEOUT_S = 2.0
MAX_BODY_BYTES = 2 << 20  # above the 1 MB prompt below
SLACK_S = 2.0  # scheduling noise on a loaded 2-core CI machine
BOUND_ARGS = ("--http-header-timeout", str(HEADER_TIMEOUT_S), "--http-body-timeout", str(BODY_TIMEOUT_S),
              "--http-max-body-size", str(MAX_BODY_BYTES))
SERVER_ARGS = ("--max-total-tokens", "8192", "--context-length", "2048")

EVIL_CODE = "import pathlib\npathlib.Path(__file__).with_name('{marker}').write_text('model code ran')\n"


def make_evil_model_dir(src: Path, dst: Path, architecture: str = "LlamaForCausalLM") -> Path:
    """A copy of `src` whose config.json and tokenizer_config.json point (auto_map) at modules
    that write a marker file when imported."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = [architecture]
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (dst / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((dst / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (dst / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for module in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (dst / f"{module}.py").write_text(EVIL_CODE.format(marker=f"{module}.ran"))
    return dst


def markers(model_dir: Path) -> list[str]:
    return sorted(p.name for p in model_dir.glob("*.ran"))


@pytest.fixture(scope="module")
def evil_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    return make_evil_model_dir(tiny_llama_dir, tmp_path_factory.mktemp("evil") / "model")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, evil_model_dir: Path):
    started = start_server(tmp_path_factory.mktemp("hardened"), *SERVER_ARGS, *BOUND_ARGS,
                           "--model-path", str(evil_model_dir), "--trust-remote-code")
    yield started
    started.stop()


# ---- item 7: model-directory code never runs -------------------------------------------------


def test_trust_remote_code_serves_without_running_model_code(server, evil_model_dir):
    """Launcher and scheduler both loaded the config and the tokenizer (the server answers
    text), and no module of the model directory was imported."""
    with server.client() as http:
        reply = http.post("/generate", json={"text": "Hello", "sampling_params": {"max_new_tokens": 2}})
    assert reply.status_code == 200, reply.text
    assert markers(evil_model_dir) == []


def test_custom_code_config_needs_the_flag_and_an_implemented_architecture(evil_model_dir, tmp_path):
    with pytest.raises(ModelConfigError, match="auto_map.*--trust-remote-code"):
        ModelConfig.from_server_args(ServerArgs().replace(model_path=str(evil_model_dir)))
    config = ModelConfig.from_server_args(ServerArgs().replace(model_path=str(evil_model_dir), trust_remote_code=True))
    assert config.architecture == "LlamaForCausalLM" and type(config.hf_config).__name__ == "LlamaConfig"
    assert load_tokenizer(str(evil_model_dir)).encode("Hello")
    unknown = make_evil_model_dir(evil_model_dir, tmp_path / "unknown", architecture="EvilForCausalLM")
    with pytest.raises(ModelConfigError, match="EvilForCausalLM"):
        ModelConfig.from_server_args(ServerArgs().replace(model_path=str(unknown), trust_remote_code=True))
    assert markers(evil_model_dir) == [] and markers(unknown) == []


# ---- item 4: out-of-range numbers --------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/generate"])
def test_top_k_beyond_any_integer_type_is_a_400_naming_it(server, path, stream):
    huge = 10**30
    body = {
        "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "top_k": huge},
        "/v1/completions": {"prompt": "hi", "max_tokens": 2, "top_k": huge},
        "/generate": {"text": "hi", "sampling_params": {"max_new_tokens": 2, "top_k": huge}},
    }[path]
    with server.client() as http:
        reply = http.post(path, json={**body, "stream": stream})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "top_k" and "top_k" in error["message"] and error["type"] == "invalid_request_error"


def test_an_error_after_the_stream_started_ends_with_an_error_event_and_done(server):
    """A stream whose request fails once the 200 is out ends with an error event and [DONE],
    not a cut connection. The failure: its rid is in use by a running stream. The first stream
    stays open, unread past its first line, so it cannot end meanwhile: its cumulative /generate
    events (~23 MB over 1900 tokens) block on the socket long before its last token."""
    body = {"text": "Once upon a time", "rid": "taken", "stream": True,
            "sampling_params": {"max_new_tokens": 1900, "ignore_eos": True}}
    with server.client() as http, server.client() as other:
        with http.stream("POST", "/generate", json=body) as first:
            assert first.status_code == 200
            # Held: a dropped line iterator would close the connection, which aborts the first.
            first_lines = first.iter_lines()
            assert json.loads(next(first_lines).removeprefix("data: "))["meta_info"]["finish_reason"] is None
            with other.stream("POST", "/generate", json={**body, "sampling_params": {"max_new_tokens": 2}}) as second:
                assert second.status_code == 200
                lines = [line for line in second.iter_lines() if line]
    assert len(lines) == 2 and lines[-1] == "data: [DONE]", lines
    error = json.loads(lines[0].removeprefix("data: "))["error"]
    assert error["param"] == "rid" and "'taken' is already in use" in error["message"], lines


# ---- item 5: slow and malformed clients ---------------------------------------------------------


def _connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.settimeout(BODY_TIMEOUT_S + HEADER_TIMEOUT_S + 10)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _status_and_error(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


def _stalled_clients(server, count: int, payload: bytes) -> tuple[list[bytes], float]:
    """`count` connections send `payload` and then nothing; what each got and the time until
    the last was answered and closed."""
    sockets = [_connect(server) for _ in range(count)]
    start = time.monotonic()
    for sock in sockets:
        sock.sendall(payload)
    replies = [_read_until_closed(sock) for sock in sockets]
    elapsed = time.monotonic() - start
    for sock in sockets:
        sock.close()
    return replies, elapsed


def test_half_a_body_then_silence_gets_408_within_the_bound(server):
    body = json.dumps({"prompt": "x" * 1000, "max_tokens": 1}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    replies, elapsed = _stalled_clients(server, 50, head + body[: len(body) // 2])
    assert elapsed < BODY_TIMEOUT_S + SLACK_S, elapsed
    for reply in replies:
        status, error = _status_and_error(reply)
        assert status == 408 and error["code"] == "request_timeout", reply


def test_half_the_headers_then_silence_is_closed_within_the_bound(server):
    replies, elapsed = _stalled_clients(server, 50, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
    assert elapsed < HEADER_TIMEOUT_S + SLACK_S, elapsed
    assert replies == [b""] * 50


def test_huge_chunk_size_gets_408_within_the_bound(server):
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    replies, elapsed = _stalled_clients(server, 5, head + b"fffffffffffffff\r\n" + b"{" * 100)
    assert elapsed < BODY_TIMEOUT_S + SLACK_S, elapsed
    assert all(_status_and_error(r)[0] == 408 for r in replies), replies


def test_chunked_body_beyond_the_size_limit_is_refused(server):
    """413 as soon as the limit is passed; the server closes with the rest unread, so the
    kernel may reset the connection before the 413 is read -- either way it is over at once."""
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * (1 << 20)
    start = time.monotonic()
    with _connect(server) as sock:
        try:
            sock.sendall(head)
            for _ in range(3):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            reply = _read_until_closed(sock)
        except ConnectionResetError:
            reply = b""
    assert time.monotonic() - start < SLACK_S
    if reply:
        status, error = _status_and_error(reply)
        assert status == 413 and error["code"] == "request_too_large"


@pytest.mark.parametrize(("payload", "status"), [
    (b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n", 400),
    (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n{", 413),
    (b"GARBAGE\x00\x01 / HTTP/9\r\n\r\n", 400),
    # A 400 is written at 64 KiB, but closing with the rest unread may reset the connection
    # before the client reads it: then "closed at once" is what can be checked.
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 + b"\r\n\r\n", None),
], ids=["chunked+content-length", "declared-too-large", "not-http", "huge-header"])
def test_malformed_http_gets_a_json_error_at_once(server, payload, status):
    start = time.monotonic()
    with _connect(server) as sock:
        try:
            sock.sendall(payload)
            reply = _read_until_closed(sock)
        except ConnectionResetError:
            reply = b""
    assert time.monotonic() - start < SLACK_S
    if status is None:  # the 400 may be cut short by the reset
        assert reply == b"" or reply.startswith(b"HTTP/1.1 400"), reply[:300]
    else:
        assert _status_and_error(reply)[0] == status, reply[:300]


# ---- item 6: the event loop stays free -------------------------------------------------------


def test_health_stays_fast_while_a_1mb_prompt_is_tokenized(server):
    prompt = "The quick brown fox jumps over the lazy dog. " * ((1 << 20) // 45)
    done = threading.Event()
    big: dict[str, float | int] = {}

    def tokenize_big() -> None:
        start = time.monotonic()
        with server.client() as http:
            big["status"] = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1}).status_code
        big["seconds"] = time.monotonic() - start
        done.set()

    latencies = []
    with httpx.Client(base_url=server.base_url, timeout=10) as probe:
        probe.get("/health")  # connect first: only the answer time is measured
        threading.Thread(target=tokenize_big).start()
        while not done.is_set():
            start = time.monotonic()
            assert probe.get("/health").status_code == 200
            latencies.append(time.monotonic() - start)
            time.sleep(0.01)
    assert big["status"] == 400  # ~230k tokens do not fit the context; they were tokenized first
    assert len(latencies) >= 5, big  # the probe really ran while the prompt was being tokenized
    # Tokenizing on the event loop held every probe for the whole tokenization (2.1 s before the
    # fix). On a 2-core CI machine the OS may still park the loop's thread now and then (one
    # probe in ~100 once took 0.6 s in a full CI run), so the bound is on the 95th percentile.
    latencies.sort()
    assert latencies[int(0.95 * (len(latencies) - 1))] < 0.1, (latencies[-5:], big)
    assert latencies[-1] < 1.0, (latencies[-5:], big)
