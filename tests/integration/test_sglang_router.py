"""The real sglang-router (PyPI sglang-router 0.3.2, from the `test` extra) in regular mode in front
of two meshserve servers: answers through it equal a direct server's, and it registers the
workers under the real model name — which needs the worker routes it reads (flat
/server_info, /model_info; /get_load), checked here directly too."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import httpx
import pytest

from meshserve.messages import SchedulerStats
from tests.conftest import SERVER_TEST_ARGS
from tests.router_process import RouterProcess, start_router
from tests.server_process import ServerProcess, free_port, start_server

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def second_server(tmp_path_factory: pytest.TempPathFactory, default_model_dir) -> Iterator[ServerProcess]:
    server = start_server(tmp_path_factory.mktemp("sglang_router_worker"), *SERVER_TEST_ARGS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sglang_router(default_server: ServerProcess, second_server: ServerProcess,
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    import sglang_router  # noqa: F401 - fails here, clearly, without the test extra

    urls = [default_server.base_url, second_server.base_url]
    # Its defaults bind 0.0.0.0 and Prometheus on 29000: both kept on loopback, on a free port.
    command = [sys.executable, "-m", "sglang_router.launch_router", "--worker-urls", *urls, "--policy", "round_robin",
               "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port())]
    router = start_router(tmp_path_factory.mktemp("sglang_router"), command)
    try:
        # Workers register in the background, after its probes of each one.
        router.wait_until("/v1/models", lambda r: r.status_code == 200 and r.json().get("data"), timeout=180)
        yield router
    finally:
        router.stop()


def test_worker_info_routes_in_sglang_shape(default_server: ServerProcess) -> None:
    with default_server.client() as http:
        info, alias = http.get("/get_server_info").json(), http.get("/server_info").json()
        model_info, model_alias = http.get("/get_model_info").json(), http.get("/model_info").json()
        load = http.get("/get_load").json()
    for key in ("scheduler_stats", "scheduler_info"):  # live values: compared apart
        info.pop(key), alias.pop(key)
    assert info == alias and model_info == model_alias
    # Flat, under SGLang's server-args names, with the values in use; meshserve's groups too.
    assert info["model"] == info["served_model_name"] == MODEL and isinstance(info["model_path"], str)
    assert (info["tp_size"], info["dp_size"], info["disaggregation_mode"]) == (1, 1, "null")
    assert info["max_total_tokens"] == 8192 and info["version"]
    assert info["cache"]["max_total_tokens"] == 8192 and info["api_key"] is None
    assert model_info["architectures"] == ["LlamaForCausalLM"] and model_info["model_type"] == "llama"
    # Every field of the scheduler's load report, whatever fields it grows, plus the in-flight count.
    assert set(SchedulerStats.__struct_fields__) <= set(load) and load["num_in_flight"] == 0


def test_models_through_it_name_the_real_model(sglang_router: RouterProcess) -> None:
    with sglang_router.client() as http:
        ids = [m["id"] for m in http.get("/v1/models").json()["data"]]
    assert ids and set(ids) == {MODEL}


@pytest.mark.parametrize("stream", [False, True])
def test_chat_and_completions_through_it_equal_a_direct_server(sglang_router: RouterProcess,
                                                               default_server: ServerProcess, stream: bool) -> None:
    def ask(client) -> tuple[str, str]:
        common = {"model": MODEL, "max_tokens": 12, "temperature": 0, "stream": stream}
        chat = client.chat.completions.create(messages=MESSAGES, **common)
        completion = client.completions.create(prompt="The sky is", **common)
        if stream:
            return ("".join(c.choices[0].delta.content or "" for c in chat if c.choices),
                    "".join(c.choices[0].text for c in completion if c.choices))
        return chat.choices[0].message.content, completion.choices[0].text

    direct = ask(default_server.openai())
    routed = [ask(sglang_router.openai()) for _ in range(2)]  # round robin: both workers
    assert routed == [direct, direct] and all(direct)


def test_generate_through_it_equals_a_direct_server(sglang_router: RouterProcess,
                                                    default_server: ServerProcess) -> None:
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    direct = httpx.post(f"{default_server.base_url}/generate", json=body, timeout=120).json()
    with sglang_router.client() as http:
        routed = [http.post("/generate", json=body) for _ in range(2)]
    assert all(r.status_code == 200 for r in routed), [r.text for r in routed]
    assert [(r.json()["text"], r.json()["output_ids"]) for r in routed] == [(direct["text"], direct["output_ids"])] * 2
