"""``meshserve doctor``: a multi-node preflight, run on every node before the server.

    meshserve doctor --dist-init-addr H:P --nnodes N --node-rank R \
                     [--model-path M] [--device cpu|cuda] [--timeout S]

It walks the server's own start-up path, step by step, and ends in one verdict line:

1. rendezvous address: parse ``--dist-init-addr``, resolve the host (retrying: on Kubernetes
   the leader's name may appear late);
2. interface: the cluster interface and address (meshserve.cluster.net), exported for gloo/NCCL;
3. devices: CPU cores, or the CUDA devices and the NCCL version;
4. model files: the cheap hashes of config.json, the weight index and the tokenizer;
5. join: the cluster coordinator's handshake on P+1 — node 0 is reachable, and versions and
   model files match (a mismatch is refused with a per-field diff, as the server would);
6. process group: torch.distributed over the TCPStore on P (world size N, one process per
   node);
7. all-reduce: a small tensor over gloo (cpu) or NCCL (cuda), checked and timed;
8. nodes: every node's interface and address, all-gathered through the store.

Ports: the doctor uses P and P+1, the very ports the server will use, so that it tests the
same paths and firewall rules. Run it before the server: while a server holds those ports,
node 0's doctor reports them busy.

Time-bounded: each step waits at most until the ``--timeout`` deadline, and a watchdog ends
the process with a FAIL line naming the step if anything (e.g. an NCCL call) overruns it.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from meshserve.cluster.auth import ClusterSecret, SecretError
from meshserve.cluster.coordinator import ClusterCoordinator, ClusterError
from meshserve.cluster.fingerprint import Fingerprint, ModelFiles
from meshserve.cluster.net import (
    ClusterNet,
    HostPort,
    NetError,
    choose_cluster_interface,
    export_for_torch,
)
from meshserve.cluster.rendezvous import Rendezvous

if TYPE_CHECKING:
    import torch.distributed

__all__ = ["main"]

#: Extra time the watchdog grants past the deadline for a step to report its own failure.
WATCHDOG_GRACE_S = 5.0
#: Timed all-reduce iterations (after one warm-up) and their size.
ALLREDUCE_ITERS = 10
ALLREDUCE_ELEMENTS = 1024  # float32: 4 KiB
#: How long a node r > 0 waits for node 0's final "doctor finished" before leaving.
FINISH_WAIT_S = 5.0


class _StepFailed(Exception):
    """A step failed; its message is the verdict's reason."""


class _NodeRecord(msgspec.Struct, frozen=True):
    """One node's line of the node table, all-gathered through the TCPStore (step 8)."""

    node_rank: int
    hostname: str
    interface: str
    address: str
    devices: str


@dataclass
class _Doctor:
    dist_init: HostPort
    nnodes: int
    node_rank: int
    model_path: str | None
    device: str
    timeout: float
    secret: ClusterSecret
    deadline: float = 0.0
    step: str = "start"
    net: ClusterNet | None = None
    rendezvous: Rendezvous | None = None
    devices: str = ""
    model: ModelFiles | None = None
    allreduce_ms: float = 0.0
    finished: threading.Event = field(default_factory=threading.Event)

    def remaining(self) -> float:
        return max(0.1, self.deadline - time.monotonic())

    def say(self, line: str) -> None:
        print(f"doctor: [ok] {self.step}: {line}", flush=True)

    # ---- steps ---------------------------------------------------------------------------

    def choose_interface(self) -> None:
        self.step = "interface"
        try:
            self.net = choose_cluster_interface(self.dist_init, self.nnodes,
                                                deadline=self.deadline)
        except NetError as err:
            raise _StepFailed(str(err)) from err
        exported = export_for_torch(self.net)
        self.say(f"{self.net.describe()} [{' '.join(exported)}]")

    def check_devices(self) -> None:
        self.step = "devices"
        import torch

        if self.device == "cuda":
            if not torch.cuda.is_available():
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                raise _StepFailed(f"--device cuda, but torch sees no CUDA device "
                                  f"(CUDA_VISIBLE_DEVICES={visible!r})")
            count = torch.cuda.device_count()
            names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
            self.devices = f"{count} x {', '.join(names)}"
            nccl = ".".join(map(str, torch.cuda.nccl.version()))
            self.say(f"{self.devices} (cuda), torch {torch.__version__}, NCCL {nccl}")
        else:
            self.devices = f"cpu ({os.cpu_count()} cores)"
            self.say(f"{self.devices}, torch {torch.__version__}")

    def hash_model(self) -> None:
        self.step = "model files"
        if self.model_path is None:
            self.say("not checked (no --model-path)")
            return
        try:
            self.model = ModelFiles.of(self.model_path)
        except OSError as err:
            raise _StepFailed(f"cannot read --model-path {self.model_path}: {err}") from err
        if self.model.weights_files == 0:
            raise _StepFailed(f"--model-path {self.model_path} holds no weight files")
        self.say(self.model.describe())

    def join(self) -> ClusterCoordinator:
        self.step = "join"
        assert self.net is not None
        fingerprint = Fingerprint.collect(
            device=self.device, graph={"nnodes": self.nnodes, "device": self.device},
            model=self.model)
        port = self.dist_init.port + 1
        address = (self.net.address if self.node_rank == 0 else self.net.dist_init_ip, port)
        coordinator = ClusterCoordinator(
            node_rank=self.node_rank, nnodes=self.nnodes, address=address,
            fingerprint=fingerprint, secret=self.secret, startup_timeout=self.remaining(),
            on_failure=self._on_cluster_event)
        started = time.monotonic()
        try:
            coordinator.start()
        except ClusterError as err:
            raise _StepFailed(str(err)) from err
        took = time.monotonic() - started
        if self.node_rank == 0:
            self.say(f"all {self.nnodes} node(s) joined the coordinator on "
                     f"{_hostport(*address)} in {took:.1f} s; versions and model files match")
        else:
            self.say(f"node 0's coordinator at {_hostport(*address)} reachable; admitted, "
                     f"cluster whole after {took:.1f} s; versions and model files match")
        return coordinator

    def _on_cluster_event(self, reason: str, clean: bool) -> None:
        """The coordinator's on_failure: node 0's clean stop ends a run; any other failure
        (a node died or failed a step) ends this node's run at once rather than letting it
        wait out its timeout."""
        if clean:
            self.finished.set()
            return
        print(f"doctor: FAIL — {self.step}: {_one_line(reason)}", flush=True)
        os._exit(1)

    def form_group(self) -> torch.distributed.Store:
        """torch.distributed over a TCPStore on P. Node 0's store listens on the cluster
        address only (a socket bound here, handed to the store), never on all interfaces."""
        self.step = "process group"
        import torch.distributed as dist

        assert self.net is not None
        timeout = datetime.timedelta(seconds=self.remaining())
        port = self.dist_init.port
        started = time.monotonic()
        try:
            # The server's own path: node 0's store on loopback behind the authenticating
            # gate on P, reached from the other nodes through a loopback relay.
            # Kept on self: the store (node 0) and the relay must outlive this step.
            if self.node_rank == 0:
                self.rendezvous = Rendezvous.serve(self.net.address, port, self.secret)
            else:
                self.rendezvous = Rendezvous.relay(self.net.dist_init_ip, port, self.secret)
            host, _, local_port = self.rendezvous.address.rpartition(":")
            store = dist.TCPStore(host, int(local_port), self.nnodes, False, timeout=timeout)
            backend = "nccl" if self.device == "cuda" else "gloo"
            device_id = None
            if self.device == "cuda":
                import torch

                # The first visible device (CUDA_VISIBLE_DEVICES picks it); naming it makes
                # NCCL connect here, so that its errors belong to this step.
                device_id = torch.device("cuda", 0)
                torch.cuda.set_device(device_id)
            dist.init_process_group(backend, store=store, rank=self.node_rank,
                                    world_size=self.nnodes, timeout=timeout,
                                    device_id=device_id)
        except (OSError, RuntimeError) as err:
            raise _StepFailed(f"torch.distributed on {_hostport(self.net.dist_init_ip, port)}: "
                              f"{_error_text(err)}") from err
        self.say(f"{backend} world of {self.nnodes} formed through the TCPStore on "
                 f"{_hostport(self.net.dist_init_ip, port)} in {time.monotonic() - started:.1f} s")
        return store

    def all_reduce(self) -> None:
        self.step = "all-reduce"
        import torch
        import torch.distributed as dist

        dev = torch.device("cuda", torch.cuda.current_device()) if self.device == "cuda" else None
        expected = self.nnodes * (self.nnodes + 1) / 2
        times: list[float] = []
        for i in range(ALLREDUCE_ITERS + 1):
            x = torch.full((ALLREDUCE_ELEMENTS,), float(self.node_rank + 1), device=dev)
            started = time.perf_counter()
            dist.all_reduce(x)
            if dev is not None:
                torch.cuda.synchronize(dev)
            if i > 0:  # the first call sets up connections
                times.append(time.perf_counter() - started)
            if not bool(torch.all(x == expected)):
                raise _StepFailed(f"all-reduce returned {x[0].item()} instead of {expected}")
        self.allreduce_ms = statistics.median(times) * 1e3
        self.say(f"{ALLREDUCE_ELEMENTS * 4 // 1024} KiB, median {self.allreduce_ms:.2f} ms of "
                 f"{ALLREDUCE_ITERS}, result correct")

    def gather_nodes(self, store: torch.distributed.Store) -> None:
        self.step = "nodes"
        import torch.distributed as dist

        assert self.net is not None
        mine = _NodeRecord(node_rank=self.node_rank, hostname=socket.gethostname(),
                           interface=self.net.interface, address=self.net.address,
                           devices=self.devices)
        # JSON (typed msgspec, no pickle): the store's value type is a string.
        store.set(f"doctor/node/{self.node_rank}", msgspec.json.encode(mine).decode())
        for r in range(self.nnodes):
            rec = msgspec.json.decode(store.get(f"doctor/node/{r}"), type=_NodeRecord)
            self.say(f"node {rec.node_rank}: {rec.hostname}, {rec.interface} "
                     f"({rec.address}), {rec.devices}")
        dist.barrier()  # nobody tears down while another still reads the store
        dist.destroy_process_group()

    def finish(self, coordinator: ClusterCoordinator) -> None:
        """Node 0 stops the coordinator cleanly; the others wait for that stop, so that no
        node looks like it left early."""
        self.step = "finish"
        if self.node_rank != 0:
            self.finished.wait(FINISH_WAIT_S)
        coordinator.shutdown(clean=True, reason="doctor finished")

    def verdict(self) -> str:
        assert self.net is not None
        model = "model files match" if self.model is not None else "no model files checked"
        return (f"doctor: OK — {self.nnodes} node(s), interface {self.net.interface} "
                f"({self.net.address}), all-reduce {self.allreduce_ms:.2f} ms, {model}")


def _error_text(err: BaseException) -> str:
    """One line for a failure: a step's own message, or a library error's type, first line
    and the line NCCL puts after "Last error:" (the actual cause)."""
    if isinstance(err, _StepFailed):
        return _one_line(str(err))
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    text = f"{type(err).__name__}: {lines[0] if lines else ''}"
    if "Last error:" in lines[:-1]:
        text += f" — {lines[lines.index('Last error:') + 1]}"
    return text


def _one_line(text: str) -> str:
    """The verdict is one line: a multi-line reason (a fingerprint diff) is joined."""
    head, *rest = [part.strip() for part in text.splitlines() if part.strip()] or [""]
    return " ".join([head, "; ".join(rest)]) if rest else head


def _hostport(host: str, port: int) -> str:
    return str(HostPort(host, port))


def _watchdog(doctor: _Doctor) -> threading.Timer:
    def expire() -> None:
        print(f"doctor: FAIL — step '{doctor.step}' did not finish within the "
              f"{doctor.timeout:g} s timeout (a peer that stopped mid-way, or a network path "
              f"that drops packets)", flush=True)
        os._exit(1)

    timer = threading.Timer(doctor.timeout + WATCHDOG_GRACE_S, expire)
    timer.daemon = True
    return timer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshserve doctor", allow_abbrev=False,
        description="Multi-node preflight: run on every node with the server's "
                    "--dist-init-addr/--nnodes/--node-rank before starting the server.")
    parser.add_argument("--dist-init-addr", required=True, metavar="HOST:PORT",
                        help="node 0's HOST:PORT, as given to the server (uses PORT and PORT+1)")
    parser.add_argument("--nnodes", type=int, default=1, help="number of nodes (default: 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this node's rank (default: 0)")
    parser.add_argument("--model-path", help="model directory to compare across nodes")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="device type (default: cuda if torch sees a GPU, else cpu)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds the whole check may take (default: 60)")
    parser.add_argument("--cluster-secret", help="the server's cluster secret (default: "
                        "$MESHSERVE_CLUSTER_SECRET; node 0 generates one when none is given)")
    parser.add_argument("--cluster-secret-file", metavar="PATH", help="file holding the secret")
    parser.add_argument("--verbose", action="store_true", help="log the coordinator's progress")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if ns.nnodes < 1 or not 0 <= ns.node_rank < ns.nnodes:
        parser.error(f"--node-rank must be in 0..{ns.nnodes - 1} and --nnodes >= 1")
    try:
        dist_init = HostPort.parse(ns.dist_init_addr)
    except NetError as err:
        parser.error(str(err))
    if dist_init.port + 1 > 65535:
        parser.error("--dist-init-addr port must leave room for PORT+1")
    # The doctor reports every outcome itself; the coordinator's log only with --verbose.
    logging.basicConfig(level=logging.INFO if ns.verbose else logging.CRITICAL,
                        format="doctor: %(message)s")
    device = ns.device
    if device is None:
        from meshserve.config.server_args import cuda_is_available

        device = "cuda" if cuda_is_available() else "cpu"
    try:
        secret = ClusterSecret.resolve(flag=ns.cluster_secret, file=ns.cluster_secret_file,
                                       node_rank=ns.node_rank)
    except SecretError as err:
        parser.error(str(err))
    if secret.generated and ns.nnodes > 1:
        print(f"doctor: no cluster secret given; run the other nodes with {secret.start_line()}",
              flush=True)
    doctor = _Doctor(dist_init=dist_init, nnodes=ns.nnodes, node_rank=ns.node_rank,
                     model_path=ns.model_path, device=device, timeout=ns.timeout, secret=secret)
    doctor.deadline = time.monotonic() + ns.timeout
    watchdog = _watchdog(doctor)
    watchdog.start()
    print(f"doctor: node {ns.node_rank} of {ns.nnodes}, rendezvous {dist_init} (ports "
          f"{dist_init.port} store, {dist_init.port + 1} coordinator), device {device}",
          flush=True)
    try:
        doctor.choose_interface()
        doctor.check_devices()
        doctor.hash_model()
        coordinator = doctor.join()
        try:
            store = doctor.form_group()
            doctor.all_reduce()
            doctor.gather_nodes(store)
        except Exception as err:
            coordinator.shutdown(clean=False, reason=f"doctor failed at step '{doctor.step}': "
                                                     f"{_error_text(err)}")
            raise
        doctor.finish(coordinator)
    except Exception as err:  # _StepFailed, or a library's (NCCL's) error: still one verdict
        print(f"doctor: FAIL — {doctor.step}: {_error_text(err)}", flush=True)
        return 1
    finally:
        watchdog.cancel()
    print(doctor.verdict(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
