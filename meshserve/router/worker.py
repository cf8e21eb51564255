"""Worker: one server behind the router, with its circuit breaker and its load.

The breaker is a pure state machine (no clock, no I/O) so its transitions are unit-tested as is:

    in  --(failure_threshold consecutive failed probes,
           or request_failure_threshold consecutive failed requests)-->  out
    out --(success_threshold consecutive good probes)-->                  in

Only probes bring a worker back: requests are never sent to a worker that is out, so a request
success cannot be observed there. A good request or probe resets the failure streak that it
belongs to; a failed probe resets the probe success streak.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Role(str, Enum):
    REGULAR = "regular"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class CircuitBreaker:
    failure_threshold: int
    success_threshold: int
    request_failure_threshold: int
    healthy: bool = True
    failed_probes: int = 0
    good_probes: int = 0
    failed_requests: int = 0

    def record_probe(self, ok: bool) -> None:
        if ok:
            self.failed_probes = 0
            self.good_probes += 1
            if not self.healthy and self.good_probes >= self.success_threshold:
                self.healthy = True
                self.failed_requests = 0
        else:
            self.good_probes = 0
            self.failed_probes += 1
            if self.failed_probes >= self.failure_threshold:
                self.healthy = False

    def record_request(self, ok: bool) -> None:
        if ok:
            self.failed_requests = 0
            return
        self.failed_requests += 1
        if self.failed_requests >= self.request_failure_threshold:
            self.healthy = False
            self.good_probes = 0


@dataclass
class Worker:
    url: str
    breaker: CircuitBreaker
    role: Role = Role.REGULAR
    # PD prefill only: the KV bootstrap port given on the command line (None: the server's own).
    bootstrap_port: int | None = None
    # Requests this router has sent and not finished with.
    in_flight: int = 0
    # The worker's own in-flight count from its /get_load (includes other clients' requests).
    reported_load: int = 0

    @property
    def healthy(self) -> bool:
        return self.breaker.healthy

    @property
    def load(self) -> int:
        """The larger of the router's live count and the worker's last report: the report sees
        other clients, the live count is fresher for this router's own requests."""
        return max(self.in_flight, self.reported_load)

    @property
    def host(self) -> str:
        """The URL's host name, as a PD decode server reaches this prefill for its KV."""
        rest = self.url.split("://", 1)[-1].split("/", 1)[0]
        if rest.startswith("["):
            return rest[1:rest.index("]")]
        return rest.rsplit(":", 1)[0] if ":" in rest else rest
