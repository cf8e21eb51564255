"""WorkerPool: the workers behind the router, by role, with one policy per role.

Invariants:
* A URL is in the pool at most once (whatever its role).
* `pick` only returns healthy workers; it prefers ones not yet tried for this request (a retry
  goes elsewhere when anywhere else is healthy) and returns None when none is healthy.
* Breaker transitions are logged once, where they happen (here).
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping

from meshserve.router.args import HealthConfig
from meshserve.router.policies import Policy
from meshserve.router.worker import CircuitBreaker, Role, Worker

log = logging.getLogger(__name__)


class WorkerPool:
    def __init__(self, health: HealthConfig, request_failure_threshold: int, policies: Mapping[Role, Policy]) -> None:
        self._health = health
        self._request_failure_threshold = request_failure_threshold
        self._policies = dict(policies)
        self._workers: dict[str, Worker] = {}

    @property
    def roles(self) -> tuple[Role, ...]:
        return tuple(self._policies)

    def workers(self, role: Role | None = None) -> list[Worker]:
        return [w for w in self._workers.values() if role is None or w.role == role]

    def get(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def add(self, url: str, role: Role, bootstrap_port: int | None = None) -> Worker:
        if url in self._workers:
            raise ValueError(f"worker {url} is already in the pool")
        if role not in self._policies:
            raise ValueError(f"this router has no {role.value} workers (roles: {', '.join(r.value for r in self.roles)})")
        breaker = CircuitBreaker(failure_threshold=self._health.failure_threshold,
                                 success_threshold=self._health.success_threshold,
                                 request_failure_threshold=self._request_failure_threshold)
        worker = Worker(url, breaker, role, bootstrap_port)
        self._workers[url] = worker
        log.info("added %s worker %s", role.value, url)
        return worker

    def remove(self, url: str) -> Worker | None:
        worker = self._workers.pop(url, None)
        if worker is not None:
            self._policies[worker.role].forget(url)
            log.info("removed %s worker %s", worker.role.value, url)
        return worker

    def healthy(self, role: Role) -> list[Worker]:
        return [w for w in self.workers(role) if w.healthy]

    def pick(self, role: Role, text: str, tried: Collection[str] = ()) -> Worker | None:
        healthy = self.healthy(role)
        candidates = [w for w in healthy if w.url not in tried] or healthy
        return self._policies[role].select(candidates, text) if candidates else None

    def record_request(self, worker: Worker, ok: bool, why: str = "") -> None:
        was = worker.healthy
        worker.breaker.record_request(ok)
        if was and not worker.healthy:
            log.warning("worker %s taken out after %d failed requests in a row (last: %s)",
                        worker.url, worker.breaker.failed_requests, why)

    def record_probe(self, worker: Worker, ok: bool, why: str = "") -> None:
        was = worker.healthy
        worker.breaker.record_probe(ok)
        if was and not worker.healthy:
            log.warning("worker %s taken out after %d failed health checks (last: %s)",
                        worker.url, worker.breaker.failed_probes, why)
        elif not was and worker.healthy:
            log.info("worker %s is healthy again; back in rotation", worker.url)
