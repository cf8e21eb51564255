"""RouterArgs: the router's command line, with sglang-router's flag names.

Regular mode: `--worker-urls URL ...`. PD mode: `--pd-disaggregation --prefill URL [BOOTSTRAP_PORT]
... --decode URL ...` (`--prefill` and `--decode` repeat, one server each).

Invariants: an unknown flag, or one of sglang-router's flags whose feature this router does not
have, ends the parse with status 2 and the flag's name; abbreviations are refused (a prefix of a
long flag is not that flag).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass, field

POLICIES = ("random", "round_robin", "power_of_two", "cache_aware")

# sglang-router flags that parse there and mean something this router does not do: named in the
# refusal instead of "unrecognized arguments", so a copied command line says what is missing.
UNSUPPORTED_FLAGS: dict[str, str] = {
    "--service-discovery": "Kubernetes service discovery",
    "--prometheus-port": "a separate metrics port (metrics are served at /metrics on --port)",
    "--prometheus-host": "a separate metrics port (metrics are served at /metrics on --port)",
    "--grpc-mode": "gRPC workers",
    "--dp-aware": "data-parallel-aware routing",
    "--enable-igw": "multi-model gateway mode",
}


@dataclass(frozen=True)
class PrefillServer:
    url: str
    # The prefill's KV bootstrap port, sent to the decode as bootstrap_port; None: its default.
    bootstrap_port: int | None = None


@dataclass(frozen=True)
class CacheAwareConfig:
    # Route by prefix only when the best match covers more than this fraction of the request.
    cache_threshold: float = 0.3
    # Load is imbalanced (then the least loaded worker wins) when max - min exceeds the absolute
    # threshold AND max exceeds min times the relative one.
    balance_abs_threshold: int = 64
    balance_rel_threshold: float = 1.5
    # Characters of request text remembered per worker; the least recently used go first.
    max_tree_size: int = 2**24


@dataclass(frozen=True)
class HealthConfig:
    interval_s: float = 60.0
    timeout_s: float = 5.0
    # Consecutive failed probes that take a worker out; consecutive good ones that bring it back.
    failure_threshold: int = 3
    success_threshold: int = 2
    endpoint: str = "/health"


@dataclass(frozen=True)
class RouterArgs:
    worker_urls: tuple[str, ...] = ()
    pd_disaggregation: bool = False
    prefill: tuple[PrefillServer, ...] = ()
    decode: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 30000
    policy: str = "cache_aware"
    prefill_policy: str | None = None
    decode_policy: str | None = None
    api_key: str | None = None
    request_timeout_s: float = 1800.0
    # Largest request body in bytes (a larger one gets a 413); sglang-router's default.
    max_payload_size: int = 512 << 20
    # Further attempts, on other workers, for a request that failed before any byte reached
    # the client.
    max_retries: int = 3
    # Consecutive failed requests (connect error, 5xx) that take a worker out.
    cb_failure_threshold: int = 5
    health: HealthConfig = field(default_factory=HealthConfig)
    cache_aware: CacheAwareConfig = field(default_factory=CacheAwareConfig)
    log_level: str = "info"

    @property
    def prefill_policy_name(self) -> str:
        return self.prefill_policy or self.policy

    @property
    def decode_policy_name(self) -> str:
        return self.decode_policy or self.policy


class _Parser(argparse.ArgumentParser):
    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        for arg in args or ():
            name = arg.split("=", 1)[0]
            if name in UNSUPPORTED_FLAGS:
                self.error(f"{name} is not supported by meshserve's router: {UNSUPPORTED_FLAGS[name]}")
        return super().parse_known_args(args, namespace)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m meshserve.launch_router", allow_abbrev=False,
                description="Route OpenAI and SGLang-native requests over several meshserve servers.")
    p.add_argument("--worker-urls", nargs="+", default=[], metavar="URL", help="regular mode: the servers")
    p.add_argument("--pd-disaggregation", action="store_true", help="prefill/decode mode")
    p.add_argument("--prefill", nargs="+", action="append", default=[], metavar="URL [BOOTSTRAP_PORT]",
                   help="PD mode: a prefill server and, optionally, its bootstrap port (repeatable)")
    p.add_argument("--decode", action="append", default=[], metavar="URL", help="PD mode: a decode server (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--policy", choices=POLICIES, default="cache_aware")
    p.add_argument("--prefill-policy", choices=POLICIES, default=None, help="PD mode; default --policy")
    p.add_argument("--decode-policy", choices=POLICIES, default=None, help="PD mode; default --policy")
    p.add_argument("--api-key", default=None, help="required from clients (Bearer) and sent to the workers")
    p.add_argument("--request-timeout-secs", type=float, default=1800.0)
    p.add_argument("--max-payload-size", type=int, default=512 << 20, help="largest request body in bytes")
    p.add_argument("--retry-max-retries", type=int, default=3)
    p.add_argument("--cb-failure-threshold", type=int, default=5)
    p.add_argument("--health-check-interval-secs", type=float, default=60.0)
    p.add_argument("--health-check-timeout-secs", type=float, default=5.0)
    p.add_argument("--health-failure-threshold", type=int, default=3)
    p.add_argument("--health-success-threshold", type=int, default=2)
    p.add_argument("--health-check-endpoint", default="/health")
    p.add_argument("--cache-threshold", type=float, default=0.3)
    p.add_argument("--balance-abs-threshold", type=int, default=64)
    p.add_argument("--balance-rel-threshold", type=float, default=1.5)
    p.add_argument("--max-tree-size", type=int, default=2**24)
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    return p


def _prefill_server(parser: argparse.ArgumentParser, values: list[str]) -> PrefillServer:
    if len(values) > 2:
        parser.error(f"--prefill takes URL [BOOTSTRAP_PORT], got {' '.join(values)}")
    url = values[0].rstrip("/")
    if len(values) == 1 or values[1].lower() == "none":
        return PrefillServer(url)
    if not values[1].isdigit() or not 0 < int(values[1]) < 65536:
        parser.error(f"--prefill {values[0]}: bootstrap port must be 1..65535, got {values[1]!r}")
    return PrefillServer(url, int(values[1]))


def _positive(parser: argparse.ArgumentParser, ns: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(ns, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")


def parse_router_args(argv: Sequence[str]) -> RouterArgs:
    """Parse and check `argv`; errors exit with status 2 naming the flag."""
    parser = build_parser()
    ns = parser.parse_args(list(argv))
    _positive(parser, ns, "request_timeout_secs", "max_payload_size", "cb_failure_threshold", "health_check_interval_secs",
              "health_check_timeout_secs", "health_failure_threshold", "health_success_threshold")
    if ns.retry_max_retries < 0:
        parser.error("--retry-max-retries must be 0 or more")
    if ns.pd_disaggregation:
        if ns.worker_urls:
            parser.error("--worker-urls is for regular mode; PD mode takes --prefill and --decode")
        if not ns.prefill or not ns.decode:
            parser.error("--pd-disaggregation needs at least one --prefill and one --decode")
    else:
        if ns.prefill or ns.decode:
            parser.error("--prefill/--decode need --pd-disaggregation")
        if ns.prefill_policy or ns.decode_policy:
            parser.error("--prefill-policy/--decode-policy need --pd-disaggregation")
    return RouterArgs(
        worker_urls=tuple(u.rstrip("/") for u in ns.worker_urls),
        pd_disaggregation=ns.pd_disaggregation,
        prefill=tuple(_prefill_server(parser, v) for v in ns.prefill),
        decode=tuple(u.rstrip("/") for u in ns.decode),
        host=ns.host,
        port=ns.port,
        policy=ns.policy,
        prefill_policy=ns.prefill_policy,
        decode_policy=ns.decode_policy,
        api_key=ns.api_key,
        request_timeout_s=ns.request_timeout_secs,
        max_payload_size=ns.max_payload_size,
        max_retries=ns.retry_max_retries,
        cb_failure_threshold=ns.cb_failure_threshold,
        health=HealthConfig(interval_s=ns.health_check_interval_secs, timeout_s=ns.health_check_timeout_secs,
                            failure_threshold=ns.health_failure_threshold,
                            success_threshold=ns.health_success_threshold,
                            endpoint=ns.health_check_endpoint),
        cache_aware=CacheAwareConfig(cache_threshold=ns.cache_threshold,
                                     balance_abs_threshold=ns.balance_abs_threshold,
                                     balance_rel_threshold=ns.balance_rel_threshold,
                                     max_tree_size=ns.max_tree_size),
        log_level=ns.log_level,
    )
