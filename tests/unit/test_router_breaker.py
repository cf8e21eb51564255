"""The router's circuit breaker: the state machine alone, then through the pool."""

from __future__ import annotations

from meshserve.router.args import HealthConfig
from meshserve.router.policies import RoundRobinPolicy
from meshserve.router.pool import WorkerPool
from meshserve.router.worker import CircuitBreaker, Role


def breaker() -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=3, success_threshold=2, request_failure_threshold=2)


def test_failed_probes_take_a_worker_out_only_in_a_row() -> None:
    b = breaker()
    for ok in (False, False, True, False, False):
        b.record_probe(ok)
    assert b.healthy  # the good probe reset the streak
    b.record_probe(False)
    assert not b.healthy


def test_failed_requests_take_a_worker_out_only_in_a_row() -> None:
    b = breaker()
    b.record_request(False)
    b.record_request(True)
    b.record_request(False)
    assert b.healthy
    b.record_request(False)
    assert not b.healthy


def test_good_probes_in_a_row_bring_it_back() -> None:
    b = breaker()
    b.record_request(False)
    b.record_request(False)
    assert not b.healthy
    b.record_probe(True)
    assert not b.healthy
    b.record_probe(False)  # breaks the success streak
    b.record_probe(True)
    assert not b.healthy
    b.record_probe(True)
    assert b.healthy and b.failed_requests == 0
    # Back with a clean request streak: one more failure does not take it out again.
    b.record_request(False)
    assert b.healthy


def test_good_probes_before_the_trip_do_not_count_for_the_return() -> None:
    b = breaker()
    b.record_probe(True)
    b.record_probe(True)
    b.record_request(False)
    b.record_request(False)
    assert not b.healthy
    b.record_probe(True)
    assert not b.healthy


def test_pool_picks_only_healthy_workers_and_prefers_untried_ones() -> None:
    pool = WorkerPool(HealthConfig(failure_threshold=1, success_threshold=1), 1, {Role.REGULAR: RoundRobinPolicy()})
    a, b = pool.add("http://a", Role.REGULAR), pool.add("http://b", Role.REGULAR)
    assert pool.pick(Role.REGULAR, "", tried=["http://a"]) is b
    assert pool.pick(Role.REGULAR, "", tried=["http://a", "http://b"]) in (a, b)  # all tried: any healthy
    pool.record_request(a, ok=False)
    assert [pool.pick(Role.REGULAR, "").url for _ in range(3)] == ["http://b"] * 3
    pool.record_probe(b, ok=False)
    assert pool.pick(Role.REGULAR, "") is None
    pool.record_probe(a, ok=True)
    assert pool.pick(Role.REGULAR, "") is a
    assert pool.remove("http://a") is a and pool.remove("http://a") is None
    assert pool.pick(Role.REGULAR, "") is None
