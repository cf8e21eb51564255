"""A router process for integration tests: meshserve's (`python -m meshserve.launch_router`) or
the real sglang-router, on 127.0.0.1, logged to a file, stopped (SIGTERM, then SIGKILL) after."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.server_process import free_port

REPO = Path(__file__).resolve().parent.parent


@dataclass
class RouterProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    api_key: str | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, timeout: float = 120.0, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout, **kwargs)

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=self.api_key or "none", max_retries=0)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, path: str, accept, timeout: float = 120.0) -> None:
        """Until GET `path` answers a response that `accept(response)` likes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"router exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                with self.client(timeout=5) as http:
                    if accept(http.get(path)):
                        return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"router not ready within {timeout:.0f} s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def start_router(log_dir: Path, command: Sequence[str], api_key: str | None = None,
                 port: int | None = None) -> RouterProcess:
    """Run `command` + `--host 127.0.0.1 --port P` (a free port unless given); not waited for."""
    port = port or free_port()
    log_path = log_dir / f"router-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                                   stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "NO_PROXY": "127.0.0.1"})
    return RouterProcess(process, port, log_path, api_key)


def meshserve_router_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshserve.launch_router", *args]
