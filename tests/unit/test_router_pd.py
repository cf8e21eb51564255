"""PD mode: the bootstrap fields, the pairing, and what the client gets when one side fails —
through the real router app over HTTP, in front of small recording worker apps."""

from __future__ import annotations

import contextlib
import random
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from meshserve.router.app import create_router_app
from meshserve.router.args import parse_router_args
from meshserve.router.bootstrap import ROOM_LIMIT, batch_size, with_bootstrap
from meshserve.router.worker import CircuitBreaker, Role, Worker
from tests.router_fakes import STREAM_EVENTS, FakeWorker, fake_workers, serve, sse_events


def test_with_bootstrap_single_and_batch() -> None:
    rng = random.Random(3)
    body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}, "bootstrap_room": 5}
    out = with_bootstrap(body, "10.0.0.1", 8998, rng)
    assert out["bootstrap_host"] == "10.0.0.1" and out["bootstrap_port"] == 8998
    assert isinstance(out["bootstrap_room"], int) and 0 <= out["bootstrap_room"] < ROOM_LIMIT
    assert out["bootstrap_room"] != 5 and body["bootstrap_room"] == 5  # a copy; the router's room wins
    batch = with_bootstrap({"text": ["a", "b", "c"]}, "h", None, rng)
    assert batch["bootstrap_host"] == ["h"] * 3 and batch["bootstrap_port"] == [None] * 3
    assert len(set(batch["bootstrap_room"])) == 3
    ids = with_bootstrap({"input_ids": [[1, 2], [3]]}, "h", 1, rng)
    assert len(ids["bootstrap_room"]) == 2
    assert batch_size({"input_ids": [1, 2, 3]}) is None and batch_size({"messages": []}) is None


@pytest.mark.parametrize(("url", "host"), [
    ("http://10.0.0.1:30000", "10.0.0.1"), ("http://prefill-0.cluster:8000/", "prefill-0.cluster"),
    ("https://node", "node"), ("http://[fd00::1]:30000", "fd00::1")])
def test_bootstrap_host_is_the_prefill_urls_host(url: str, host: str) -> None:
    assert Worker(url, CircuitBreaker(1, 1, 1), Role.PREFILL).host == host


@contextlib.contextmanager
def pd_router(prefills: list[FakeWorker], decodes: list[FakeWorker], *extra: str) -> Iterator[httpx.Client]:
    argv = ["--pd-disaggregation", "--policy", "round_robin", *extra]
    for i, p in enumerate(prefills):
        argv += ["--prefill", p.url, *([str(9000 + i)] if i % 2 == 0 else [])]
    for d in decodes:
        argv += ["--decode", d.url]
    with serve(create_router_app(parse_router_args(argv), random.Random(0))) as url:
        with httpx.Client(base_url=url, timeout=30) as client:
            yield client


def test_both_servers_get_the_request_at_once() -> None:
    """The prefill answers only after the decode got the request: sent one after the other,
    this would take 10 s and end in a 500."""
    with fake_workers("p", "d") as (p, d), pd_router([p], [d]) as router:
        p.peer, d.delay_s = d, 0.2
        answer = router.post("/generate", json={"text": "x"})
    assert answer.status_code == 200 and answer.json()["worker"] == "d"


def test_each_request_goes_to_a_pair_with_the_same_bootstrap_fields() -> None:
    with fake_workers("p0", "p1", "d0", "d1") as (p0, p1, d0, d1), pd_router([p0, p1], [d0, d1]) as router:
        answers = [router.post("/generate", json={"text": f"q{i}", "sampling_params": {"max_new_tokens": 1}}).json()
                   for i in range(4)]
        chat = router.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]})
    assert [a["worker"] for a in answers] == ["d0", "d1", "d0", "d1"]  # the decode's answer
    assert chat.json()["worker"] == "d0"
    assert len(p0.received) + len(p1.received) == len(d0.received) + len(d1.received) == 5
    decode_by_room = {r.body["bootstrap_room"]: r for d in (d0, d1) for r in d.received}
    for prefill, port in ((p0, 9000), (p1, None)):
        for got in prefill.received:
            twin = decode_by_room[got.body["bootstrap_room"]]
            assert got.body == twin.body and got.path == twin.path
            assert got.body["bootstrap_host"] == "127.0.0.1" and got.body["bootstrap_port"] == port
    assert len(decode_by_room) == 5
    # round_robin on both sides: every prefill used, pairs vary
    assert Counter(len(p.received) for p in (p0, p1)) == Counter({3: 1, 2: 1})


def test_streams_the_decode_answer_and_batches_get_lists() -> None:
    with fake_workers("p", "d") as (p, d), pd_router([p], [d]) as router:
        with router.stream("POST", "/generate", json={"text": "x", "stream": True}) as response:
            events = sse_events(response.read().decode())
        batch = router.post("/generate", json={"text": ["a", "b"]}).json()
    assert [e["worker"] for e in events[:-1]] == ["d"] * STREAM_EVENTS and events[-1] == "[DONE]"
    assert len(batch["body"]["bootstrap_room"]) == 2 and batch["body"]["bootstrap_port"] == [9000, 9000]
    assert p.received[-1].body["bootstrap_room"] == batch["body"]["bootstrap_room"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_prefill_refusal_reaches_the_client_and_cancels_the_decode(stream: bool) -> None:
    with fake_workers("p", "d") as (p, d), pd_router([p], [d]) as router:
        p.status, d.hang = 400, True
        response = router.post("/generate", json={"text": "x", "stream": stream})
        deadline = time.monotonic() + 10
        while not d.hung_up and time.monotonic() < deadline:
            time.sleep(0.05)
    assert response.status_code == 400 and response.json()["error"]["message"] == "p says no"
    assert len(d.received) == 1 and d.hung_up == 1  # the decode's connection was closed
    assert len(p.received) == 1  # a 4xx is the request's fault: not retried


def test_a_failing_prefill_is_retried_on_a_new_pair_with_a_new_room() -> None:
    with fake_workers("bad", "good", "d") as (bad, good, d), pd_router([bad, good], [d]) as router:
        bad.status, d.delay_s = 503, 0.5
        answer = router.post("/generate", json={"text": "x"})
        metrics = router.get("/metrics").text
    assert answer.status_code == 200 and answer.json()["worker"] == "d"
    assert len(bad.received) == 1 and len(good.received) == 1 and len(d.received) == 2
    assert bad.received[0].body["bootstrap_room"] != good.received[0].body["bootstrap_room"]
    assert answer.json()["body"]["bootstrap_room"] == good.received[0].body["bootstrap_room"]
    assert "meshserve_router:retries_total 1.0" in metrics


def test_health_and_worker_list_by_role() -> None:
    with fake_workers("p", "d") as (p, d), pd_router([p], [d]) as router:
        assert router.get("/health").status_code == 200
        workers = router.get("/list_workers").json()
        assert router.post("/remove_worker", params={"url": d.url}).status_code == 200
        unhealthy = router.get("/health")
        assert router.post("/add_worker", params={"url": d.url, "worker_type": "decode"}).status_code == 200
        wrong = router.post("/add_worker", params={"url": d.url, "worker_type": "regular"})
        assert router.get("/health").status_code == 200
        assert router.get("/v1/models").json()["data"][0]["id"] == "model-of-d"  # the decode's
    assert {(w["url"], w["role"], w["bootstrap_port"]) for w in workers["workers"]} == {
        (p.url, "prefill", 9000), (d.url, "decode", None)}
    assert unhealthy.status_code == 503 and "decode" in unhealthy.json()["error"]["message"]
    assert wrong.status_code == 400
