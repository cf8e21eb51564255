"""What a new user meets first (issue 17): fast refusals, the README's example, the API's small print."""

from __future__ import annotations

import contextlib
import io
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.server_process import ServerProcess

REPO = Path(__file__).resolve().parents[2]

# Refused before torch is imported; 5 s leaves room for a loaded 2-core machine (~0.3 s idle).
REFUSAL_LIMIT_S = 5.0


def launch_refused(*args: str) -> tuple[float, str]:
    """Run launch_server with `args`; it must exit 1. Returns (seconds, output)."""
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "meshserve.launch_server", "--device", "cpu", *args],
                            capture_output=True, text=True, cwd=REPO, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 1, result.stdout + result.stderr
    return elapsed, result.stdout + result.stderr


def test_bad_configurations_refused_within_seconds(tmp_path: Path, default_model_dir: Path) -> None:
    elapsed, out = launch_refused("--model-path", str(tmp_path / "no-such-model"))
    assert "cannot start: --model-path" in out and "does not exist" in out
    assert elapsed < REFUSAL_LIMIT_S, out

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "n_head": 12}))
    elapsed, out = launch_refused("--model-path", str(gpt2))
    assert "architecture ['GPT2LMHeadModel']" in out and "not supported; supported: LlamaForCausalLM" in out
    assert elapsed < REFUSAL_LIMIT_S, out

    # The default model has 9 heads and 3 KV heads: --tp 8 cannot split either (it used to spawn
    # 8 ranks that waited in "joining" for minutes). No rank may have started.
    elapsed, out = launch_refused("--tp", "8")
    assert "cannot run with --tp 8: 9 attention heads do not divide over --tp 8" in out
    assert "scheduler" not in out and "loading torch" not in out
    assert elapsed < REFUSAL_LIMIT_S, out


def readme_openai_example() -> str:
    """The README's OpenAI client example, verbatim."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    (example,) = [b for b in blocks if "from openai import OpenAI" in b]
    return example


def test_readme_openai_example_answers_paris(default_server: ServerProcess) -> None:
    example = readme_openai_example()
    assert "http://127.0.0.1:30000/v1" in example
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(example.replace(":30000/", f":{default_server.port}/"), {})  # noqa: S102 - our README
    assert "Paris" in out.getvalue()


def test_model_cards_and_model_info(default_server: ServerProcess) -> None:
    with default_server.client() as client:
        (card,) = client.get("/v1/models").json()["data"]
        # The server's start time: before now, and not long before this session.
        assert time.time() - 3600 < card["created"] <= time.time()
        assert client.get(f"/v1/models/{card['id']}").json() == card
        missing = client.get("/v1/models/no-such-model")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        info = client.get("/get_model_info").json()
        assert info["architectures"] == ["LlamaForCausalLM"] and info["model_type"] == "llama"


def test_probes_are_not_logged_at_info(default_server: ServerProcess) -> None:
    for _ in range(3):
        httpx.get(f"{default_server.base_url}/health", timeout=30).raise_for_status()
    # sglang-router's gRPC detection: the HTTP/2 preface. Answered, and not a warning.
    with socket.create_connection(("127.0.0.1", default_server.port), timeout=30) as sock:
        sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        assert sock.recv(64).startswith(b"HTTP/1.1 400")
    with default_server.client() as client:
        assert client.get("/v1/models").status_code == 200  # an ordinary request is still logged
    log = default_server.log()
    assert '"GET /v1/models HTTP/1.1" 200' in log
    assert "GET /health " not in log
    assert "Invalid HTTP request" not in log


def test_seed_gpu_flag_accepted_on_cpu_with_a_warning(default_model_dir: Path) -> None:
    # The seeds pass --mem-fraction-static everywhere. It passes the checks with a warning; the
    # busy port then stops the start-up cheaply, before any rank.
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        _, out = launch_refused("--mem-fraction-static", "0.82", "--port", str(busy.getsockname()[1]))
    assert "WARNING meshserve: --mem-fraction-static sizes GPU memory and has no effect on cpu" in out
    assert "cannot start" in out
