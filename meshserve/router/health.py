"""HealthMonitor: probes every worker each interval — its health endpoint (the breaker's
probes) and its /get_load (the load the policies read). Out-of-rotation workers are probed too:
that is how they come back."""

from __future__ import annotations

import asyncio
import logging

import httpx

from meshserve.router.args import HealthConfig
from meshserve.router.pool import WorkerPool
from meshserve.router.worker import Worker

log = logging.getLogger(__name__)


class HealthMonitor:
    def __init__(self, pool: WorkerPool, client: httpx.AsyncClient, config: HealthConfig,
                 headers: dict[str, str]) -> None:
        self.pool = pool
        self.client = client
        self.config = config
        self._headers = headers

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.config.interval_s)

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(w) for w in self.pool.workers()))

    async def check(self, worker: Worker) -> None:
        try:
            response = await self.client.get(worker.url + self.config.endpoint, headers=self._headers,
                                              timeout=self.config.timeout_s)
            ok, why = response.status_code == 200, f"status {response.status_code}"
        except httpx.HTTPError as err:
            ok, why = False, f"{type(err).__name__}: {err}"
        if self.pool.get(worker.url) is not worker:  # removed meanwhile
            return
        self.pool.record_probe(worker, ok, why)
        if ok:
            await self._refresh_load(worker)

    async def _refresh_load(self, worker: Worker) -> None:
        """meshserve's /get_load: `num_in_flight`; a worker without it (another server) keeps
        the router's own count."""
        try:
            response = await self.client.get(worker.url + "/get_load", headers=self._headers,
                                              timeout=self.config.timeout_s)
            load = response.json().get("num_in_flight") if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError, AttributeError):
            load = None
        worker.reported_load = load if isinstance(load, int) else 0
