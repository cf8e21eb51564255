"""ServerMetrics: the Prometheus metrics of one server, in its own CollectorRegistry.

Names follow SGLang's (`sglang:` -> `meshserve:`) so that existing dashboards need only the
prefix changed. A per-instance registry (not prometheus_client's global one) lets several
servers or test apps live in one process without duplicate-metric errors.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from meshserve.messages import SchedulerStats

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5, 5.0)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _ExpertLoadCollector(Collector):
    """MoE expert loads (layers/moe/eplb.py), totals kept by the schedulers and reported in their
    stats: counters exposed as the latest report's values. One series per logical expert and per
    expert-parallel rank (summed over MoE layers: hundreds of series, not layers × experts)."""

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self.stats: SchedulerStats | None = None

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        if stats is None or not stats.expert_tokens:
            return
        experts = CounterMetricFamily("meshserve:expert_tokens", "(token, expert) pairs routed to each logical "
                                      "expert, summed over MoE layers.", labels=("model_name", "expert"))
        for expert, count in enumerate(stats.expert_tokens):
            experts.add_metric((self.model_name, str(expert)), count)
        ranks = CounterMetricFamily("meshserve:ep_rank_tokens", "(token, expert) pairs computed by each "
                                    "expert-parallel rank, summed over MoE layers.", labels=("model_name", "ep_rank"))
        for rank, count in enumerate(stats.ep_rank_tokens):
            ranks.add_metric((self.model_name, str(rank)), count)
        yield experts
        yield ranks
        yield _single_counter("meshserve:eplb_rebalances", "EPLB rebalances of the expert placement.",
                              self.model_name, stats.eplb_rebalances)
        yield _single_counter("meshserve:eplb_moved_experts", "Expert slots given another expert's weights by "
                              "EPLB rebalances, over all MoE layers and ranks.", self.model_name,
                              stats.eplb_moved_experts)


def _single_counter(name: str, doc: str, model_name: str, value: int) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=("model_name",))
    family.add_metric((model_name,), value)
    return family


class ServerMetrics:
    """Per-sequence counters and latencies (fed by the TokenizerManager) and scheduler load
    gauges (fed from SchedulerStats)."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        label = {"model_name": model_name}

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"meshserve:{name}", doc, ("model_name", *labels), registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(f"meshserve:{name}", doc, ("model_name",), buckets=buckets, registry=self.registry)
            return metric.labels(**label)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"meshserve:{name}", doc, ("model_name",), registry=self.registry).labels(**label)

        self._model_name = model_name
        self._requests = counter("num_requests", "Finished sequences, by finish reason.", ("finish_reason",))
        self._prompt_tokens = counter("prompt_tokens", "Prompt tokens of submitted sequences.").labels(**label)
        self._cached_tokens = counter("cached_tokens", "Prompt tokens served from the prefix cache.").labels(**label)
        self._generation_tokens = counter("generation_tokens", "Generated tokens.").labels(**label)
        self._ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self._itl = histogram("inter_token_latency_seconds", "Time between generated tokens.", _ITL_BUCKETS)
        self._e2e = histogram("e2e_request_latency_seconds", "Sequence latency, arrival to finish.",
                              _LATENCY_BUCKETS)
        self._running = gauge("num_running_reqs", "Sequences running in the scheduler.")
        self._waiting = gauge("num_queue_reqs", "Sequences waiting in the scheduler.")
        self._token_usage = gauge("token_usage", "Fraction of the KV cache in use.")
        self._max_total_tokens = gauge("max_total_num_tokens", "KV cache capacity in tokens.")
        self._expert_load = _ExpertLoadCollector(model_name)
        self.registry.register(self._expert_load)

    def sequence_started(self, prompt_tokens: int) -> None:
        self._prompt_tokens.inc(prompt_tokens)

    def tokens_generated(self, count: int, *, ttft: float | None = None, itl: float | None = None) -> None:
        """`count` new tokens of one sequence; `ttft` on its first output, else `itl` (seconds
        per token since its previous output)."""
        self._generation_tokens.inc(count)
        if ttft is not None:
            self._ttft.observe(ttft)
        if itl is not None:
            self._itl.observe(itl)

    def sequence_finished(self, finish_reason: str, e2e: float, cached_tokens: int) -> None:
        self._requests.labels(model_name=self._model_name, finish_reason=finish_reason).inc()
        self._e2e.observe(e2e)
        self._cached_tokens.inc(cached_tokens)

    def scheduler_stats(self, stats: SchedulerStats) -> None:
        self._running.set(stats.num_running)
        self._waiting.set(stats.num_waiting)
        self._max_total_tokens.set(stats.max_total_tokens)
        self._token_usage.set(stats.used_tokens / stats.max_total_tokens if stats.max_total_tokens else 0.0)
        self._expert_load.stats = stats

    def render(self) -> bytes:
        return generate_latest(self.registry)
