"""Start a real `python -m meshserve.launch_server` process for integration tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

READY_TIMEOUT_S = 240.0  # model load on a 2-core CI machine, first-use conversion included


# Every port this test session has handed out. The kernel may offer a just-released port again
# before the server it went to has bound it (a server binds seconds after it is spawned); two
# servers given one port would also share one log file, where the loser's "cannot start" line is
# overwritten by the winner's log (CI failure of 2026-12-04: an exit 1 with a healthy-looking log).
_HANDED_OUT: set[int] = set()


def is_free(port: int) -> bool:
    """Nobody listens on 127.0.0.1:`port` now and this session has not handed it out."""
    if port in _HANDED_OUT:
        return False
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def reserve(port: int) -> int:
    _HANDED_OUT.add(port)
    return port


def free_port() -> int:
    """A port free now that no other caller in this session gets."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _HANDED_OUT:
            return reserve(port)


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 120.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "none", max_retries=0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def scheduler_pids(self) -> list[int]:
        """The scheduler processes (multiprocessing spawn children, not its resource tracker)."""
        children = psutil.Process(self.process.pid).children(recursive=True)
        return [c.pid for c in children if "spawn_main" in " ".join(c.cmdline())]

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_server(log_dir: Path, *args: str, api_key: str | None = None, wait: bool = True) -> ServerProcess:
    """Launch a CPU server on a free port with `args`; wait for /health 200 unless `wait` is False."""
    port = free_port()
    command = [sys.executable, "-m", "meshserve.launch_server", "--device", "cpu", "--port", str(port), *args]
    if api_key:
        command += ["--api-key", api_key]
    log_path = log_dir / f"server-{port}.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                   cwd=Path(__file__).resolve().parent.parent)
    server = ServerProcess(process, port, log_path, api_key)
    if wait:
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
    return server


@contextlib.contextmanager
def started_together(log_dir: Path, *configs: tuple[tuple[str, ...], str | None]) -> Iterator[list[ServerProcess]]:
    """Servers ((args, api key) each) launched at once and waited for together -- one start-up's
    wait rather than one each -- and stopped at the end."""
    servers: list[ServerProcess] = []
    try:
        for args, api_key in configs:
            servers.append(start_server(log_dir, *args, api_key=api_key, wait=False))
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()
