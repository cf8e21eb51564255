"""A real two-node SLURM cluster on this machine: Debian's slurmctld and two slurmd, each slurmd in
its own network namespace (tests/netns.py) with its own address, so a job's tasks run on two
"hosts"; munged on a private socket. Everything lives in one temporary directory and is stopped
(by the pids the daemons wrote) afterwards. Root only; the Debian packages are installed when
missing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import netns
from tests.debian import ensure_packages

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODE_NAMES = ("msnode-a", "msnode-b")


@dataclass(frozen=True)
class SlurmCluster:
    root: Path
    ns_a: str  # runs slurmctld, slurmd of NODE_NAMES[0], and the commands below
    ns_b: str
    addrs: tuple[str, str]

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def run(self, *cmd: str, env: dict[str, str] | None = None, timeout: float = 30) -> str:
        """A command in namespace A (where the controller is reachable); its stdout."""
        out = subprocess.run(["ip", "netns", "exec", self.ns_a, *cmd], env=env or self.env(),
                             capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"{cmd}: {out.stderr}"
        return out.stdout

    def job_state(self, job_id: str) -> str:
        return self.run("squeue", "-h", "-j", job_id, "-o", "%T").strip()

    def logs(self) -> str:
        return "".join(f"== {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))


def _cgroup_plugin() -> str:
    """slurmd 22.05 loads a cgroup plugin even with proctrack/linuxproc and task/none; name the
    hierarchy this machine has (its autodetection misreads a hybrid v1 layout)."""
    kind = subprocess.run(["stat", "-f", "-c", "%T", "/sys/fs/cgroup"], capture_output=True, text=True).stdout
    return "cgroup/v2" if kind.strip() == "cgroup2fs" else "cgroup/v1"


def _config(root: Path, addrs: tuple[str, str]) -> str:
    nodes = "\n".join(f"NodeName={name} NodeAddr={addr} CPUs={os.cpu_count()} State=UNKNOWN"
                      for name, addr in zip(NODE_NAMES, addrs))
    return f"""ClusterName=meshserve-test
SlurmctldHost={os.uname().nodename}({addrs[0]})
AuthType=auth/munge
AuthInfo=socket={root}/munge.sock
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool-%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/linear
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
KillWait=5
{nodes}
PartitionName=test Nodes={",".join(NODE_NAMES)} Default=YES MaxTime=INFINITE State=UP
"""


def _start(cmd: list[str], what: str, root: Path) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if out.returncode:
        raise AssertionError(f"{what} did not start: {out.stderr}\n{''.join(p.read_text() for p in root.glob('*.log'))}")


@contextlib.contextmanager
def slurm_cluster(root: Path) -> Iterator[SlurmCluster]:
    if os.geteuid() != 0:
        pytest.skip("SKIPPED, NOT TESTED: a SLURM cluster needs root (daemons, network namespaces)")
    ensure_packages(PACKAGES, ("slurmctld", "slurmd", "sbatch", "munged"))
    with netns.two_namespaces() as (ns_a, ns_b):
        addrs = (f"{netns.SUBNET}.1", f"{netns.SUBNET}.2")
        (root / "state").mkdir()
        for name in NODE_NAMES:
            (root / f"spool-{name}").mkdir()
        conf = root / "slurm.conf"
        conf.write_text(_config(root, addrs))
        (root / "cgroup.conf").write_text(f"CgroupPlugin={_cgroup_plugin()}\nCgroupAutomount=no\n")
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        pid_files = [root / "munged.pid"]
        try:
            _start(["munged", "--force", f"--socket={root}/munge.sock", f"--key-file={key}",
                    f"--log-file={root}/munged.log", f"--pid-file={root}/munged.pid",
                    f"--seed-file={root}/munged.seed"], "munged", root)
            pid_files.append(root / "slurmctld.pid")
            _start(["ip", "netns", "exec", ns_a, "slurmctld", "-i", "-f", str(conf)], "slurmctld", root)
            for ns, name in zip((ns_a, ns_b), NODE_NAMES):
                pid_files.append(root / f"slurmd-{name}.pid")
                _start(["ip", "netns", "exec", ns, "slurmd", "-N", name, "-f", str(conf)], f"slurmd {name}", root)
            cluster = SlurmCluster(root, ns_a, ns_b, addrs)
            deadline = time.monotonic() + 30
            while cluster.run("sinfo", "-h", "-N", "-o", "%T").split() != ["idle", "idle"]:
                assert time.monotonic() < deadline, f"nodes never became idle:\n{cluster.logs()}"
                time.sleep(0.5)
            yield cluster
        finally:
            _stop(pid_files)


def _stop(pid_files: list[Path]) -> None:
    """The daemons this cluster started, newest first, each by the pid it wrote."""
    for pid_file in reversed(pid_files):
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not _alive(pid):
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Running, not a zombie (a daemon's parent is init, which may be slow to reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
