"""RouterMetrics: the router's Prometheus metrics, in its own registry.

Counters are cumulative per worker URL (they outlive a removed worker, as Prometheus expects);
the per-worker gauges are read from the pool at scrape time, so a removed worker disappears.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from meshserve.router.pool import WorkerPool

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _PoolGauges(Collector):
    def __init__(self, pool: WorkerPool) -> None:
        self._pool = pool

    def collect(self) -> Iterator[GaugeMetricFamily]:
        healthy = GaugeMetricFamily("meshserve_router:worker_healthy", "1 if the worker is in rotation",
                                    labels=("worker", "role"))
        in_flight = GaugeMetricFamily("meshserve_router:worker_in_flight",
                                      "requests this router has in flight on the worker", labels=("worker", "role"))
        load = GaugeMetricFamily("meshserve_router:worker_load",
                                 "the worker's load as the policies see it", labels=("worker", "role"))
        for w in self._pool.workers():
            labels = (w.url, w.role.value)
            healthy.add_metric(labels, 1.0 if w.healthy else 0.0)
            in_flight.add_metric(labels, w.in_flight)
            load.add_metric(labels, w.load)
        yield from (healthy, in_flight, load)


class RouterMetrics:
    def __init__(self, pool: WorkerPool) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter("meshserve_router:requests", "requests sent to a worker (each attempt)",
                                 ("worker", "route"), registry=self.registry)
        self._errors = Counter("meshserve_router:request_errors",
                               "failed attempts: no_answer (connection refused, reset or timed out before the status), server_error (5xx), interrupted (body cut)",
                               ("worker", "reason"), registry=self.registry)
        self._retries = Counter("meshserve_router:retries", "attempts on another worker after a failure",
                                registry=self.registry)
        self.registry.register(_PoolGauges(pool))

    def sent(self, worker: str, route: str) -> None:
        self._requests.labels(worker, route).inc()

    def error(self, worker: str, reason: str) -> None:
        self._errors.labels(worker, reason).inc()

    def retried(self) -> None:
        self._retries.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
