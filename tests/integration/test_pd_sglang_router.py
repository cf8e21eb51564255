"""The real sglang-router (PyPI sglang-router 0.3.2) in PD mode in front of a meshserve prefill
server and a meshserve decode server (NIXL, tp 1): chat, completions (streamed and not) and
/generate through it equal a plain meshserve server's answers, token for token."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.pd_cluster import Prefill, start_decode, start_prefill, wait_idle
from tests.router_process import RouterProcess, start_router
from tests.server_process import ServerProcess, free_port

pytest.importorskip("sglang_router", reason="sglang-router is not installed (pip install sglang-router==0.3.2)")

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def pd_behind_sglang_router(tmp_path_factory: pytest.TempPathFactory,
                            default_model_dir) -> Iterator[tuple[Prefill, ServerProcess, RouterProcess]]:
    log_dir = tmp_path_factory.mktemp("pd_sglang_router")
    prefill, decode = start_prefill(log_dir), start_decode(log_dir)
    router = None
    try:
        prefill.server.wait_ready()
        decode.wait_ready()
        # Its defaults bind 0.0.0.0 and Prometheus on 29000: both kept on loopback, on a free port.
        router = start_router(log_dir, [
            sys.executable, "-m", "sglang_router.launch_router", "--pd-disaggregation",
            "--prefill", prefill.server.base_url, str(prefill.bootstrap_port), "--decode", decode.base_url,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())])
        router.wait_until("/v1/models", lambda r: r.status_code == 200 and r.json().get("data"), timeout=180)
        yield prefill, decode, router
    finally:
        if router is not None:
            router.stop()
        prefill.server.stop()
        decode.stop()


def _ask(client, i: int) -> str:
    prompt = f"Count from {i} to {i + 5}, then name a colour."
    common = {"model": MODEL, "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    stream = i % 2 == 1
    if i % 4 < 2:
        out = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=stream, **common)
        return "".join(c.choices[0].delta.content or "" for c in out if c.choices) if stream \
            else out.choices[0].message.content
    out = client.completions.create(prompt=prompt, stream=stream, **common)
    return "".join(c.choices[0].text for c in out if c.choices) if stream else out.choices[0].text


def test_openai_requests_through_it_equal_a_plain_server(pd_behind_sglang_router, default_server: ServerProcess) -> None:
    prefill, decode, router = pd_behind_sglang_router
    with ThreadPoolExecutor(8) as pool:
        routed = list(pool.map(lambda i: _ask(router.openai(), i), range(8)))
    plain = [_ask(default_server.openai(), i) for i in range(8)]
    assert routed == plain and all(plain)
    wait_idle(prefill.server, decode)


def test_generate_through_it_equals_a_plain_server(pd_behind_sglang_router, default_server: ServerProcess) -> None:
    prefill, decode, router = pd_behind_sglang_router
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    plain = httpx.post(f"{default_server.base_url}/generate", json=body, timeout=120).json()
    with router.client() as http:
        routed = http.post("/generate", json=body)
    assert routed.status_code == 200, routed.text
    assert (routed.json()["text"], routed.json()["output_ids"]) == (plain["text"], plain["output_ids"])
    wait_idle(prefill.server, decode)
