"""meshserve's router (`python -m meshserve.launch_router`, a process) in front of two real servers
on the default model, both guarded by the same API key: outputs equal a direct server's, the
round-robin split, the key, worker management, disconnects, and a worker SIGKILLed mid-run.
The kill test is last: the module's second server does not survive it."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import SERVER_TEST_ARGS
from tests.router_process import RouterProcess, meshserve_router_command, start_router
from tests.server_process import ServerProcess, started_together

MODEL = "SmolLM2-135M-Instruct"
KEY = "router-test-key"


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`, in a Prometheus page."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith((name + "{", name + " ")) and all(w in line for w in wanted))


def scrape(url: str) -> str:
    return httpx.get(f"{url}/metrics", timeout=30).text


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory, default_model_dir) -> Iterator[list[ServerProcess]]:
    with started_together(tmp_path_factory.mktemp("router_workers"), (SERVER_TEST_ARGS, KEY), (SERVER_TEST_ARGS, KEY)) as started:
        yield started


@pytest.fixture(scope="module")
def router(servers: list[ServerProcess], tmp_path_factory: pytest.TempPathFactory) -> Iterator[RouterProcess]:
    command = meshserve_router_command("--worker-urls", *(s.base_url for s in servers), "--policy", "round_robin",
                                       "--api-key", KEY, "--cb-failure-threshold", "2",
                                       "--health-check-interval-secs", "2")
    process = start_router(tmp_path_factory.mktemp("router"), command, api_key=KEY)
    try:
        process.wait_until("/health", lambda response: response.status_code == 200)
        yield process
    finally:
        process.stop()


def _ask(client, i: int) -> str:
    """Request i of the mix: chat or completion, streamed or not (greedy, 12 tokens: a greedy
    completion may otherwise end at once, and empty answers would prove little)."""
    prompt = f"Count from {i} to {i + 5}, then name a colour."
    common = {"model": MODEL, "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    stream = i % 2 == 1
    if i % 4 < 2:
        out = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], stream=stream, **common)
        return "".join(c.choices[0].delta.content or "" for c in out) if stream else out.choices[0].message.content
    out = client.completions.create(prompt=prompt, stream=stream, **common)
    return "".join(c.choices[0].text for c in out) if stream else out.choices[0].text


def test_32_concurrent_requests_through_the_router_equal_a_direct_server(servers, router) -> None:
    direct, routed = servers[0].openai(), router.openai()
    with ThreadPoolExecutor(32) as pool:
        expected = list(pool.map(lambda i: _ask(direct, i), range(32)))
    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(lambda i: _ask(routed, i), range(32)))
    assert got == expected and all(expected)
    assert router.openai().models.list().data[0].id == MODEL


def test_round_robin_splits_evenly(servers, router) -> None:
    def counts() -> list[float]:
        page = scrape(router.base_url)
        return [metric(page, "meshserve_router:requests_total", worker=s.base_url) for s in servers]

    def served() -> list[float]:
        return [metric(scrape(s.base_url), "meshserve:num_requests_total", finish_reason="length") for s in servers]

    before, served_before = counts(), served()
    with router.client() as http:
        for i in range(8):
            http.post("/generate", json={"text": f"n{i}", "sampling_params": {
                "max_new_tokens": 2, "ignore_eos": True}}).raise_for_status()
    assert [a - b for a, b in zip(counts(), before)] == [4, 4]
    assert [a - b for a, b in zip(served(), served_before)] == [4, 4]  # the workers' own counters agree


def test_the_api_key_is_required_and_forwarded(servers, router) -> None:
    anonymous = httpx.Client(base_url=router.base_url, timeout=30)
    body = {"text": "x", "sampling_params": {"max_new_tokens": 1}}
    refused = [anonymous.post("/generate", json=body), anonymous.get("/v1/models"), anonymous.get("/list_workers"),
               anonymous.post("/v1/completions", json={"model": MODEL, "prompt": "x"},
                              headers={"Authorization": "Bearer wrong"})]
    assert [r.status_code for r in refused] == [401] * 4
    assert anonymous.get("/health").status_code == 200 and anonymous.get("/metrics").status_code == 200
    anonymous.close()
    # The workers refuse a request without the key, so the router's successes mean it sent it.
    assert httpx.post(f"{servers[0].base_url}/generate", json=body, timeout=30).status_code == 401
    with router.client() as http:
        assert http.post("/generate", json=body).status_code == 200
        info = http.get("/get_server_info")
    assert info.status_code == 200 and KEY not in info.text
    assert [w["server_info"]["model"] for w in info.json()["workers"]] == [MODEL, MODEL]


def test_workers_are_listed_removed_and_added(servers, router) -> None:
    a, b = (s.base_url for s in servers)
    with router.client() as http:
        assert http.get("/list_workers").json()["urls"] == [a, b]
        assert http.post("/remove_worker", params={"url": b}).status_code == 200
        assert http.get("/list_workers").json()["urls"] == [a]
        before = metric(scrape(router.base_url), "meshserve_router:requests_total", worker=b)
        for i in range(4):
            http.post("/generate", json={"text": f"r{i}", "sampling_params": {"max_new_tokens": 1}}).raise_for_status()
        assert metric(scrape(router.base_url), "meshserve_router:requests_total", worker=b) == before
        assert http.post("/add_worker", params={"url": b}).status_code == 200
        assert http.get("/list_workers").json()["urls"] == [a, b]


def _wait_idle(servers: list[ServerProcess], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.5)
        pages = [scrape(s.base_url) for s in servers]
        if all(metric(p, "meshserve:num_running_reqs") == metric(p, "meshserve:num_queue_reqs") == 0 for p in pages):
            return
    raise AssertionError("a worker still runs the abandoned request")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_disconnect_aborts_the_request_on_the_worker(servers, router, stream: bool) -> None:
    def aborted() -> float:
        return sum(metric(scrape(s.base_url), "meshserve:num_requests_total", finish_reason="abort") for s in servers)

    before = aborted()
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": stream}
    with router.client(timeout=30.0 if stream else 1.0) as http:
        if stream:
            with http.stream("POST", "/v1/completions", json=body) as response:
                next(response.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/completions", json=body)
    _wait_idle(servers)
    assert aborted() == before + 1


def test_a_worker_killed_mid_run_is_taken_out_and_no_request_is_lost(servers, router) -> None:
    """Non-streamed requests: a stream already started on the dead worker cannot be retried
    (it ends with an error event), a non-streamed answer can, since nothing was sent yet."""
    survivor, victim = servers
    count, tokens = 12, 120  # long enough that none can finish between the check and the kill
    answers: list[dict | None] = [None] * count

    def ask(i: int) -> None:
        with router.client() as http:
            response = http.post("/v1/completions", json={
                "model": MODEL, "prompt": f"Story {i}:", "max_tokens": tokens, "temperature": 0, "ignore_eos": True})
            answers[i] = response.json() if response.status_code == 200 else {"status": response.status_code}

    tokens_before = metric(scrape(victim.base_url), "meshserve:generation_tokens_total")
    survivor_before = metric(scrape(router.base_url), "meshserve_router:requests_total", worker=survivor.base_url)
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()

    def victim_has_output() -> bool:
        """The victim is mid-run: it has requests of ours and has produced tokens already."""
        with router.client() as http:
            workers = {w["url"]: w for w in http.get("/list_workers").json()["workers"]}
        return (workers[victim.base_url]["in_flight"] > 0
                and metric(scrape(victim.base_url), "meshserve:generation_tokens_total") > tokens_before)

    deadline = time.monotonic() + 60
    while not victim_has_output():
        assert time.monotonic() < deadline, "the victim never ran a request"
        time.sleep(0.05)
    schedulers = victim.scheduler_pids()
    victim.process.send_signal(signal.SIGKILL)
    for pid in schedulers:
        with contextlib.suppress(ProcessLookupError):  # gone with its parent already
            os.kill(pid, signal.SIGKILL)
    for thread in threads:
        thread.join(240)

    assert all(a is not None and a.get("usage", {}).get("completion_tokens") == tokens for a in answers), answers
    page = scrape(router.base_url)
    retries = metric(page, "meshserve_router:retries_total")
    assert retries >= 1
    # The retried requests went to the survivor, on top of its own share.
    assert metric(page, "meshserve_router:requests_total", worker=survivor.base_url) - survivor_before >= \
        count // 2 + retries
    assert metric(page, "meshserve_router:worker_healthy", worker=victim.base_url) == 0
    with router.client() as http:
        workers = {w["url"]: w["healthy"] for w in http.get("/list_workers").json()["workers"]}
        after = [http.post("/generate", json={"text": f"after {i}", "sampling_params": {"max_new_tokens": 2}})
                 for i in range(4)]
    assert workers == {survivor.base_url: True, victim.base_url: False}
    assert all(r.status_code == 200 for r in after)
