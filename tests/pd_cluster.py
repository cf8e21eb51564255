"""Prefill and decode servers for the PD integration tests (tests/integration/test_pd_*.py):
real `python -m meshserve.launch_server` processes on 127.0.0.1, and a test-side sender that
does what a PD router does — the same body, with bootstrap fields, to both halves at once."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import SERVER_TEST_ARGS
from tests.server_process import ServerProcess, free_port, start_server

# UCX over TCP (the network path) rather than shared memory between processes on one host.
PD_ENV = {"UCX_TLS": "tcp"}


@dataclass
class Prefill:
    server: ServerProcess
    bootstrap_port: int


def start_prefill(log_dir: Path, *args: str, backend: str = "nixl", env: dict[str, str] | None = None,
                  wait: bool = False, bootstrap_port: int | None = None) -> Prefill:
    """A prefill server (or one node of it: every node of a prefill server gets the same
    bootstrap port, where its ranks register)."""
    port = bootstrap_port or free_port()
    with _environment({**PD_ENV, **(env or {})}):
        server = start_server(log_dir, *SERVER_TEST_ARGS, "--disaggregation-mode", "prefill",
                              "--disaggregation-bootstrap-port", str(port),
                              "--disaggregation-transfer-backend", backend, *args, wait=wait)
    return Prefill(server, port)


def start_decode(log_dir: Path, *args: str, backend: str = "nixl", wait: bool = False) -> ServerProcess:
    with _environment(PD_ENV):
        return start_server(log_dir, *SERVER_TEST_ARGS, "--disaggregation-mode", "decode",
                            "--disaggregation-transfer-backend", backend, *args, wait=wait)


@contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """os.environ plus `values` while a server process is spawned (it copies os.environ)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@dataclass
class Answer:
    status: int
    body: dict
    seconds: float


def send_pd(prefill: Prefill, decode: ServerProcess, path: str, body: dict,
            timeout: float = 120.0, room: int | None = None) -> tuple[Answer, Answer]:
    """POST `body` plus `room` (default: a fresh one) to both halves at once; (prefill's,
    decode's) answers."""
    pd_body = {**body, "bootstrap_host": "127.0.0.1", "bootstrap_port": prefill.bootstrap_port,
               "bootstrap_room": random.randrange(2**63) if room is None else room}

    def post(server: ServerProcess) -> Answer:
        start = time.monotonic()
        try:
            response = httpx.post(f"{server.base_url}{path}", json=pd_body, timeout=timeout)
            status, payload = response.status_code, response.json()
        except (httpx.HTTPError, ValueError) as exc:  # a killed server: no HTTP answer at all
            status, payload = 0, {"error": repr(exc)}
        return Answer(status, payload, time.monotonic() - start)

    with ThreadPoolExecutor(2) as pool:
        first, second = pool.submit(post, prefill.server), pool.submit(post, decode)
        return first.result(), second.result()


def load(server: ServerProcess) -> dict:
    return httpx.get(f"{server.base_url}/get_load", timeout=10).json()


def wait_idle(*servers: ServerProcess, timeout: float = 30.0) -> None:
    """Until every server reports no KV in use, nothing in flight and no PD work (its stats come
    once a second); fails with the last reports otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        loads = [load(s) for s in servers]
        if all(_idle(x) for x in loads):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"not idle after {timeout:.0f} s: {loads}")
        time.sleep(0.5)


def _idle(x: dict) -> bool:
    return (x["used_tokens"], x["num_in_flight"], x["num_running"], x["num_waiting"], x["kv_transfers_in_flight"],
            x["num_bootstrapping"], x["num_awaiting_kv"], x["num_awaiting_ack"]) == (0,) * 8
