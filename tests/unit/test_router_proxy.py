"""Regular mode through the real router app over HTTP, in front of small recording worker apps:
retries, the circuit breaker, health checks, streams, disconnects, the API key, load."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from meshserve.router.app import create_router_app
from meshserve.router.args import parse_router_args
from tests.router_fakes import STREAM_EVENTS, dead_url, fake_workers, serve, sse_events


@contextlib.contextmanager
def router(urls: list[str], *extra: str, api_key: str | None = None) -> Iterator[httpx.Client]:
    argv = ["--worker-urls", *urls, "--policy", "round_robin", *extra]
    if api_key:
        argv += ["--api-key", api_key]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with serve(create_router_app(parse_router_args(argv), random.Random(0))) as url:
        with httpx.Client(base_url=url, timeout=30, headers=headers) as client:
            yield client


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def healthy(client: httpx.Client) -> dict[str, bool]:
    return {w["url"]: w["healthy"] for w in client.get("/list_workers").json()["workers"]}


def test_a_5xx_is_retried_on_the_other_worker_and_counted() -> None:
    with fake_workers("bad", "good") as (bad, good), router([bad.url, good.url]) as client:
        bad.status = 500
        answers = [client.post("/v1/completions", json={"prompt": str(i)}) for i in range(4)]
        metrics = client.get("/metrics").text
    assert all(a.status_code == 200 and a.json()["worker"] == "good" for a in answers)
    failed = len(bad.received)
    assert len(good.received) == 4 and failed >= 2  # the rotation gave it at least every other turn
    assert f"meshserve_router:retries_total {failed}.0" in metrics
    assert f'meshserve_router:request_errors_total{{reason="server_error",worker="{bad.url}"}} {failed}.0' in metrics
    assert f'meshserve_router:requests_total{{route="/v1/completions",worker="{good.url}"}} 4.0' in metrics


def test_a_4xx_is_the_answer_not_a_failure() -> None:
    with fake_workers("a", "b") as (a, b), router([a.url, b.url]) as client:
        a.status = b.status = 400
        answer = client.post("/generate", json={"text": "x"})
        not_json = client.post("/generate", content=b"{oops")
        states = healthy(client)
    assert answer.status_code == 400 and answer.json()["error"]["message"] == "a says no"
    assert not_json.status_code == 400  # the worker's own answer (the router forwards what it cannot parse)
    assert len(a.received) + len(b.received) == 1 and all(states.values())


def test_an_unreachable_worker_is_taken_out_after_consecutive_failures() -> None:
    with dead_url() as dead, fake_workers("good") as (good,), router([dead, good.url], "--cb-failure-threshold",
                                                                      "2") as client:
        answers = [client.post("/generate", json={"text": str(i)}).status_code for i in range(6)]
        states = healthy(client)
        metrics = client.get("/metrics").text
    assert answers == [200] * 6 and len(good.received) == 6
    assert states == {dead: False, good.url: True}
    assert f'meshserve_router:request_errors_total{{reason="no_answer",worker="{dead}"}} 2.0' in metrics
    assert f'meshserve_router:worker_healthy{{role="regular",worker="{dead}"}} 0.0' in metrics


def test_no_healthy_worker_is_a_503() -> None:
    with dead_url() as dead, router([dead], "--retry-max-retries", "1") as client:
        answer = client.post("/generate", json={"text": "x"})
    assert answer.status_code == 503 and dead in answer.json()["error"]["message"]


def test_health_checks_take_a_worker_out_and_bring_it_back() -> None:
    with fake_workers("flaky", "steady") as (flaky, steady), router(
            [flaky.url, steady.url], "--health-check-interval-secs", "0.1", "--health-failure-threshold", "2",
            "--health-success-threshold", "2") as client:
        flaky.healthy = False
        wait_for(lambda: not healthy(client)[flaky.url])
        answers = [client.post("/generate", json={"text": str(i)}).json()["worker"] for i in range(4)]
        flaky.healthy = True
        wait_for(lambda: healthy(client)[flaky.url])
        after = {client.post("/generate", json={"text": str(i)}).json()["worker"] for i in range(4)}
    assert answers == ["steady"] * 4 and after == {"flaky", "steady"}


def test_a_stream_passes_through_and_a_cut_stream_ends_with_an_error_event() -> None:
    with fake_workers("a", "b") as (a, b), router([a.url, b.url]) as client:
        whole = sse_events(client.post("/generate", json={"text": "x", "stream": True}).text)
        b.cut_stream = True
        cut = client.post("/generate", json={"text": "x", "stream": True})
    assert [e["worker"] for e in whole[:-1]] == ["a"] * STREAM_EVENTS and whole[-1] == "[DONE]"
    events = sse_events(cut.text)
    assert cut.status_code == 200 and events[0] == {"worker": "b", "i": 0}
    assert events[-2]["error"]["code"] == "worker_failed" and events[-1] == "[DONE]"
    assert len(a.received) == 1  # a started stream is never retried elsewhere


def test_stream_bytes_reach_the_client_as_the_worker_sends_them() -> None:
    with fake_workers("w") as (w,), router([w.url]) as client:
        w.gate = threading.Event()
        with client.stream("POST", "/generate", json={"text": "x", "stream": True}) as response:
            lines = response.iter_lines()
            first = next(lines)  # the worker holds the rest until the client has this
            w.gate.set()
            rest = list(lines)
    assert sse_events(first) == [{"worker": "w", "i": 0}]
    assert sse_events("\n".join(rest))[-1] == "[DONE]"


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_disconnect_closes_the_upstream_request(stream: bool) -> None:
    with fake_workers("w") as (w,), router([w.url]) as client:
        w.hang = True
        with pytest.raises(httpx.ReadTimeout):
            client.post("/generate", json={"text": "x", "stream": stream}, timeout=0.5)
        wait_for(lambda: w.hung_up == 1)
        wait_for(lambda: client.get("/list_workers").json()["workers"][0]["in_flight"] == 0)


def test_api_key_is_required_and_forwarded() -> None:
    with fake_workers("w") as (w,), router([w.url], api_key="s3cret") as client:
        anonymous = httpx.Client(base_url=str(client.base_url), timeout=30)
        refused = [anonymous.post("/generate", json={"text": "x"}), anonymous.get("/list_workers"),
                   anonymous.get("/v1/models"), anonymous.post("/add_worker", params={"url": w.url}),
                   anonymous.post("/generate", json={"text": "x"}, headers={"Authorization": "Bearer nope"})]
        open_paths = [anonymous.get("/health").status_code, anonymous.get("/metrics").status_code]
        client.post("/generate", json={"text": "x"}).raise_for_status()
        info = client.get("/get_server_info").text
        anonymous.close()
    assert [r.status_code for r in refused] == [401] * 5 and open_paths == [200, 200]
    assert all(r.json()["error"]["code"] == "invalid_api_key" for r in refused)
    assert [r.authorization for r in w.received] == ["Bearer s3cret"]
    assert "s3cret" not in info


def test_an_oversized_body_is_refused_before_any_worker_sees_it() -> None:
    with fake_workers("w") as (w,), router([w.url], "--max-payload-size", "1000") as client:
        refused = client.post("/generate", json={"text": "x" * 2000})
        accepted = client.post("/generate", json={"text": "x" * 100})
    assert refused.status_code == 413 and accepted.status_code == 200 and len(w.received) == 1


def test_power_of_two_reads_the_workers_reported_load() -> None:
    with fake_workers("busy", "idle") as (busy, idle), router(
            [busy.url, idle.url], "--policy", "power_of_two", "--health-check-interval-secs", "0.1") as client:
        busy.load = 50
        wait_for(lambda: {w["url"]: w["load"] for w in client.get("/list_workers").json()["workers"]}[busy.url] == 50)
        answers = {client.post("/generate", json={"text": str(i)}).json()["worker"] for i in range(8)}
    assert answers == {"idle"}


def test_workers_can_be_listed_removed_and_added() -> None:
    with dead_url() as dead_worker, fake_workers("a", "b") as (a, b), router([a.url]) as client:
        assert client.get("/list_workers").json()["urls"] == [a.url]
        assert client.post("/add_worker", params={"url": b.url}).status_code == 200
        assert client.post("/add_worker", params={"url": b.url}).status_code == 400  # already there
        dead = client.post("/add_worker", params={"url": dead_worker})
        both = {client.post("/generate", json={"text": str(i)}).json()["worker"] for i in range(4)}
        assert client.post("/remove_worker", params={"url": a.url}).status_code == 200
        assert client.post("/remove_worker", params={"url": a.url}).status_code == 404
        only_b = {client.post("/generate", json={"text": str(i)}).json()["worker"] for i in range(4)}
        urls = client.get("/list_workers").json()["urls"]
    assert dead.status_code == 400 and "not healthy" in dead.json()["error"]["message"]
    assert both == {"a", "b"} and only_b == {"b"} and urls == [b.url]
