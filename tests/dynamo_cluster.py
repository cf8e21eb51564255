"""A real Dynamo deployment on this machine for the tests: Debian's etcd and nats-server through
deploy/dynamo/control-plane.sh, Dynamo's own frontend (`python -m dynamo.frontend`) and
meshserve workers (`python -m meshserve.dynamo.worker`), each a process with its own log,
stopped by pid. Everything binds loopback; each deployment has its own Dynamo namespace."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.debian import ensure_packages
from tests.dynamo_install import ensure_dynamo
from tests.server_process import free_port

ROOT = Path(__file__).resolve().parents[1]
CONTROL_PLANE = ROOT / "deploy" / "dynamo" / "control-plane.sh"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 30.0) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait()


@dataclass
class DynamoCluster:
    workdir: Path
    env: dict[str, str]
    frontend_url: str
    procs: list[Proc] = field(default_factory=list)

    def start(self, name: str, *argv: str, extra_env: dict[str, str] | None = None) -> Proc:
        log_path = self.workdir / f"{name}.log"
        popen = subprocess.Popen([sys.executable, *argv], env={**self.env, **(extra_env or {})}, cwd=ROOT,
                                 stdout=log_path.open("w"), stderr=subprocess.STDOUT)
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def worker(self, name: str, *flags: str, extra_env: dict[str, str] | None = None) -> Proc:
        return self.start(name, "-m", "meshserve.dynamo.worker", *flags,
                          extra_env={"DYN_TCP_RPC_PORT": str(free_port()), **(extra_env or {})})

    @property
    def namespace(self) -> str:
        return self.env["DYN_NAMESPACE"]

    def models(self) -> list[str]:
        response = httpx.get(f"{self.frontend_url}/v1/models", timeout=5)
        return [m["id"] for m in response.json()["data"]]

    def wait_model(self, model: str, *, present: bool = True, timeout: float = 180.0,
                   watch: list[Proc] | None = None) -> float:
        """Seconds until the frontend lists (or stops listing) `model`."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            for proc in watch or []:
                if proc.popen.poll() is not None:
                    raise AssertionError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log[-4000:]}")
            try:
                if (model in self.models()) == present:
                    return time.monotonic() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        logs = "\n".join(f"--- {p.name}\n{p.log[-3000:]}" for p in self.procs)
        raise AssertionError(f"the frontend did not {'list' if present else 'drop'} {model} in {timeout} s\n{logs}")

    def openai(self):
        import openai

        return openai.OpenAI(base_url=f"{self.frontend_url}/v1", api_key="none", timeout=120, max_retries=0)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        subprocess.run(["bash", str(CONTROL_PLANE), "stop", "--dir", str(self.workdir / "control-plane")],
                       env={**os.environ}, capture_output=True, timeout=60)


def start_dynamo(workdir: Path) -> DynamoCluster:
    """etcd + NATS + Dynamo's frontend; workers are started by the test."""
    ensure_packages(("etcd-server", "nats-server"), ("etcd", "nats-server"))
    site = ensure_dynamo()
    ports = {"ETCD_PORT": str(free_port()), "ETCD_PEER_PORT": str(free_port()),
             "NATS_PORT": str(free_port()), "NATS_MONITOR_PORT": str(free_port())}
    started = subprocess.run(["bash", str(CONTROL_PLANE), "start", "--dir", str(workdir / "control-plane")],
                             env={**os.environ, **ports}, capture_output=True, text=True, timeout=60)
    if started.returncode != 0:
        raise RuntimeError(f"control-plane.sh start failed: {started.stderr}")
    http_port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]),
        "ETCD_ENDPOINTS": f"http://127.0.0.1:{ports['ETCD_PORT']}",
        "NATS_SERVER": f"nats://127.0.0.1:{ports['NATS_PORT']}",
        "DYN_NAMESPACE": f"meshserve-test-{uuid.uuid4().hex[:8]}",
        "DYN_TCP_RPC_HOST": "127.0.0.1",
        "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
        "HF_HUB_OFFLINE": "1",
    }
    cluster = DynamoCluster(workdir, env, f"http://127.0.0.1:{http_port}")
    cluster.start("frontend", "-m", "dynamo.frontend", "--http-host", "127.0.0.1", "--http-port", str(http_port),
                  "--namespace", env["DYN_NAMESPACE"],
                  extra_env={"DYN_TCP_RESPONSE_STREAM_PORT": str(free_port())})
    return cluster
