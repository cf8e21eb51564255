"""deploy/dynamo/control-plane.sh, run as a user runs it, starts Debian's real etcd and nats-server
(installed by the test when missing): etcd stores and returns a key over its v3 HTTP API, NATS
speaks its protocol with JetStream on and delivers a message, a second `start` over the running
pair is refused, and `stop` leaves no process behind. deploy/dynamo/compose.yaml publishes the
same ports as the script's defaults."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import urllib.request
from pathlib import Path

import yaml

from tests.debian import ensure_packages
from tests.server_process import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "dynamo" / "control-plane.sh"
COMPOSE = ROOT / "deploy" / "dynamo" / "compose.yaml"


def _script(action: str, workdir: Path, ports: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action, "--dir", str(workdir)], env={**os.environ, **ports},
                          capture_output=True, text=True, timeout=60)


def _etcd(port: str, op: str, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v3/kv/{op}", data=json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _nats_round_trip(port: str) -> tuple[dict, bytes]:
    """The server's INFO, and what it delivers to our own subscription after one publish."""
    with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as sock:
        stream = sock.makefile("rb")
        info = json.loads(stream.readline().decode().removeprefix("INFO "))
        sock.sendall(b'CONNECT {"verbose":false}\r\nSUB meshserve.test 1\r\nPUB meshserve.test 5\r\nhello\r\nPING\r\n')
        received = b""
        while not received.endswith(b"PONG\r\n"):
            received += stream.readline()
        return info, received


def test_control_plane_script_runs_real_etcd_and_nats(tmp_path: Path):
    ensure_packages(("etcd-server", "nats-server"), ("etcd", "nats-server"))
    ports = {"ETCD_PORT": str(free_port()), "ETCD_PEER_PORT": str(free_port()),
             "NATS_PORT": str(free_port()), "NATS_MONITOR_PORT": str(free_port())}
    started = _script("start", tmp_path, ports)
    try:
        assert started.returncode == 0, started.stderr + "".join(p.read_text() for p in tmp_path.glob("*.log"))
        assert f"export ETCD_ENDPOINTS=http://127.0.0.1:{ports['ETCD_PORT']}" in started.stdout
        assert f"export NATS_SERVER=nats://127.0.0.1:{ports['NATS_PORT']}" in started.stdout

        _etcd(ports["ETCD_PORT"], "put", {"key": _b64("meshserve/probe"), "value": _b64("42")})
        kvs = _etcd(ports["ETCD_PORT"], "range", {"key": _b64("meshserve/probe")})["kvs"]
        assert [base64.b64decode(kv["value"]) for kv in kvs] == [b"42"]

        info, delivered = _nats_round_trip(ports["NATS_PORT"])
        assert info["jetstream"] is True, info
        assert b"MSG meshserve.test 1 5\r\nhello\r\n" in delivered, delivered

        again = _script("start", tmp_path, ports)
        assert again.returncode == 1 and "already running" in again.stderr, again.stderr
        assert _script("status", tmp_path, ports).returncode == 0
    finally:
        pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
        stopped = _script("stop", tmp_path, ports)
    assert stopped.returncode == 0, stopped.stderr
    assert sorted(line.split()[1] for line in stopped.stdout.splitlines()) == ["etcd", "nats"]
    assert len(pids) == 2 and not any(Path(f"/proc/{pid}").exists() for pid in pids)
    assert _script("status", tmp_path, ports).returncode == 3


def test_compose_file_publishes_the_script_default_ports():
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    assert compose["etcd"]["ports"] == ["2379:2379"]
    assert compose["nats"]["ports"] == ["4222:4222", "8222:8222"]
    assert "-js" in compose["nats"]["command"]
    script = SCRIPT.read_text()
    for default in ("ETCD_PORT:-2379", "NATS_PORT:-4222", "NATS_MONITOR_PORT:-8222"):
        assert default in script
