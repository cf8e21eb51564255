"""Prefill-decode disaggregation end to end, on the default model, for each transfer backend:
a prefill server and a decode server (tp 1 each) behind meshserve's PD router answer 32
concurrent greedy requests — chat and completions, streamed and not, through the openai client,
and /generate — exactly as a plain server does, token for token; afterwards both report no KV in
use and nothing in flight."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import SERVER_TEST_ARGS
from tests.pd_cluster import Prefill, load, send_pd, start_decode, start_prefill, wait_idle
from tests.router_process import RouterProcess, meshserve_router_command, start_router
from tests.server_process import ServerProcess, start_server

MODEL = "SmolLM2-135M-Instruct"
REQUESTS = 32


@dataclass
class PD:
    prefill: Prefill
    decode: ServerProcess
    router: RouterProcess | None


@pytest.fixture(scope="module", params=["nixl", "mooncake"])
def pd(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, default_model_dir) -> Iterator[PD]:
    log_dir = tmp_path_factory.mktemp(f"pd_{request.param}")
    prefill = start_prefill(log_dir, backend=request.param)
    decode = start_decode(log_dir, backend=request.param)
    router = None
    try:
        prefill.server.wait_ready()
        decode.wait_ready()
        router = start_router(log_dir, meshserve_router_command(
            "--pd-disaggregation", "--prefill", prefill.server.base_url, str(prefill.bootstrap_port),
            "--decode", decode.base_url))
        router.wait_until("/health", lambda response: response.status_code == 200)
        yield PD(prefill, decode, router)
    finally:
        if router is not None:
            router.stop()
        prefill.server.stop()
        decode.stop()


def _ask(client, i: int) -> tuple[str, list[int] | None]:
    """Request i of the mix: chat or completion, streamed or not; greedy, 12 tokens, no early EOS."""
    prompt = f"Count from {i} to {i + 5}, then name a colour."
    common = {"model": MODEL, "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    stream = i % 2 == 1
    if i % 4 < 2:
        out = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=stream, **common)
        return ("".join(c.choices[0].delta.content or "" for c in out if c.choices) if stream
                else out.choices[0].message.content), None
    out = client.completions.create(prompt=prompt, stream=stream, **common)
    return ("".join(c.choices[0].text for c in out if c.choices) if stream else out.choices[0].text), None


def _generate(base_url: str, i: int) -> tuple[str, list[int]]:
    body = {"text": f"Question {i}: what is {i} + {i}?", "sampling_params": {"max_new_tokens": 12, "temperature": 0,
                                                                               "ignore_eos": True}}
    answer = httpx.post(f"{base_url}/generate", json=body, timeout=120).json()
    return answer["text"], answer["output_ids"]


def _one(client, base_url: str, i: int):
    return _generate(base_url, i) if i % 5 == 4 else _ask(client, i)


def test_concurrent_requests_through_the_router_equal_a_plain_server(pd: PD, default_server: ServerProcess) -> None:
    assert pd.router is not None
    plain_client, routed_client = default_server.openai(), pd.router.openai()
    with ThreadPoolExecutor(REQUESTS) as pool:
        routed = list(pool.map(lambda i: _one(routed_client, pd.router.base_url, i), range(REQUESTS)))
    with ThreadPoolExecutor(8) as pool:
        plain = list(pool.map(lambda i: _one(plain_client, default_server.base_url, i), range(REQUESTS)))
    assert all(text for text, _ in plain)
    assert routed == plain
    wait_idle(pd.prefill.server, pd.decode)
    assert load(pd.decode)["generation_tokens"] >= REQUESTS * 11  # decoded there, not on the prefill


def test_the_prefill_answers_the_first_token_and_logprobs_cross(pd: PD, default_server: ServerProcess) -> None:
    body = {"text": "The capital of France is", "return_logprob": True,
            "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}}
    plain = httpx.post(f"{default_server.base_url}/generate", json=body, timeout=120).json()
    prefill, decode = send_pd(pd.prefill, pd.decode, "/generate", body)
    assert (prefill.status, decode.status) == (200, 200), (prefill.body, decode.body)
    assert decode.body["output_ids"] == plain["output_ids"]
    assert prefill.body["output_ids"] == plain["output_ids"][:1]
    got = [lp[0] for lp in decode.body["meta_info"]["output_token_logprobs"]]
    want = [lp[0] for lp in plain["meta_info"]["output_token_logprobs"]]
    assert got == pytest.approx(want, abs=1e-4)  # the first one computed on the prefill server
    wait_idle(pd.prefill.server, pd.decode)


def test_pd_servers_refuse_requests_without_bootstrap_fields(pd: PD) -> None:
    for server in (pd.prefill.server, pd.decode):
        response = httpx.post(f"{server.base_url}/generate", json={"text": "Hi"}, timeout=30)
        assert response.status_code == 400 and "PD router" in response.text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir) -> Iterator[tuple[ServerProcess, PD]]:
    """A plain server and a PD pair (NIXL, KV pages of 4 tokens: a transfer moves page runs) on
    the tiny random Llama: no router, the test sends to both halves itself."""
    log_dir = tmp_path_factory.mktemp("pd_tiny")
    model = ("--model-path", str(tiny_llama_dir))
    plain = start_server(log_dir, *SERVER_TEST_ARGS, *model, wait=False)
    prefill, decode = start_prefill(log_dir, *model, "--page-size", "4"), start_decode(log_dir, *model, "--page-size", "4")
    try:
        for server in (plain, prefill.server, decode):
            server.wait_ready()
        yield plain, PD(prefill, decode, router=None)
    finally:
        for server in (plain, prefill.server, decode):
            server.stop()


def test_a_tiny_random_model_with_pages_equals_a_plain_server(tiny: tuple[ServerProcess, PD]) -> None:
    plain, pd = tiny
    bodies = [{"input_ids": [(7 * i + j * 13) % 49000 + 1 for j in range(5 + 9 * i)],
               "sampling_params": {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: send_pd(pd.prefill, pd.decode, "/generate", b), bodies))
    want = [httpx.post(f"{plain.base_url}/generate", json=b, timeout=120).json()["output_ids"] for b in bodies]
    assert [decode.body.get("output_ids") for _, decode in answers] == want
    assert len(set(map(tuple, want))) == len(want)  # prompt-dependent outputs: a KV mix-up would show
    wait_idle(pd.prefill.server, pd.decode)


def test_structured_output_across_the_pd_pair(tiny: tuple[ServerProcess, PD]) -> None:
    """The prefill samples the first token under the grammar, the decode server replays it into
    its own matcher and goes on: outputs equal a plain server's (greedy and seeded) and match."""
    import json
    import re

    plain, pd = tiny
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
              "required": ["n", "tags"], "additionalProperties": False}
    grammars = [{"json_schema": json.dumps(schema)}, {"regex": r"[a-f]{2,5}-\d{1,3}"}]
    bodies = [{"text": f"Structured {i}:", "sampling_params": {**grammars[i % 2], "max_new_tokens": 64,
                                                               "temperature": 1.0 if i % 4 > 1 else 0.0, "seed": i}}
              for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: send_pd(pd.prefill, pd.decode, "/generate", b), bodies))
    want = [httpx.post(f"{plain.base_url}/generate", json=b, timeout=120).json() for b in bodies]
    assert [decode.body.get("output_ids") for _, decode in answers] == [w["output_ids"] for w in want]
    for i, (_, decode) in enumerate(answers):
        assert decode.body["meta_info"]["finish_reason"]["type"] == "stop"
        if i % 2 == 0:
            assert set(json.loads(decode.body["text"])) == {"n", "tags"}
        else:
            assert re.fullmatch(r"[a-f]{2,5}-\d{1,3}", decode.body["text"])
    wait_idle(pd.prefill.server, pd.decode)
