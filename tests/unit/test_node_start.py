"""A node's start-up order and its ranks' end: launch_server spawns a single node's ranks before
it imports torch or transformers (their start-up overlaps its own), and stopping ranks that a
watcher also waits on reaps each once, without a false "ignored SIGTERM"."""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import subprocess
import sys
import time
from pathlib import Path

from meshserve.cluster.launcher import SchedulerProcesses
from meshserve.cluster.topology import Topology
from meshserve.config.server_args import ServerArgs
from tests.server_process import free_port

REPO = Path(__file__).resolve().parents[2]


def test_launch_server_spawns_the_ranks_before_importing_torch(default_model_dir: Path) -> None:
    code = (
        "import sys\n"
        "import meshserve.cluster.launcher as launcher\n"
        "def spawn(args, rendezvous, endpoints):\n"
        "    print('at spawn:', sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
        "    raise RuntimeError('no ranks in this test')\n"
        "launcher.launch_schedulers = spawn\n"
        "from meshserve.launch_server import main\n"
        f"print('exit', main(['--model-path', {str(default_model_dir)!r}, '--device', 'cpu', '--port', '{free_port()}']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "at spawn: []" in done.stdout, done.stdout + done.stderr
    assert "exit 1" in done.stdout
    assert "cannot start the scheduler processes: RuntimeError: no ranks in this test" in done.stderr


def _sleep() -> None:
    time.sleep(60)


def test_stopping_watched_ranks_reaps_each_once(caplog) -> None:
    topology = Topology.from_args(ServerArgs.from_cli(["--tp", "2", "--device", "cpu"]))
    ctx = mp.get_context("fork")
    caplog.set_level(logging.WARNING, logger="meshserve")
    for _ in range(10):  # the watcher and shutdown race to reap; a lost race showed in about half the stops
        processes = SchedulerProcesses(endpoints=None, topology=topology)
        for _ in range(2):
            proc = ctx.Process(target=_sleep, daemon=True)
            proc.start()
            processes.processes.append(proc)
        reported: list[object] = []
        processes.watch(reported.append)
        processes.shutdown()
        assert [p.exitcode for p in processes.processes] == [-signal.SIGTERM] * 2
        assert reported == []  # stopped on purpose: not a rank failure
    assert "ignored SIGTERM" not in caplog.text
