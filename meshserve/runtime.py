"""NodeRuntime: everything one node runs under any front end, assembled in one place.

launch_server (HTTP), meshserve.AsyncEngine / Engine (in process) and the Dynamo worker all
start a node the same way: the cluster (port plan, interface, rendezvous store, coordinator
handshake), on a prefill node 0 the PD bootstrap server, this node's scheduler ranks, watched,
and the model's config with node 0's tokenizer (see NodeRuntime.start for their order). The front ends differ only in what they put
on node 0's scheduler connection (a TokenizerManager under HTTP, an async API, a Dynamo
endpoint) and in how they stop.

Start-up failures raise StartupError with one line for the user; whatever had been started is
stopped before it is raised.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshserve.config.server_args import ServerArgs

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from meshserve.cluster.launcher import SchedulerProcesses
    from meshserve.cluster.node import ClusterNode
    from meshserve.config.model_config import ModelConfig
    from meshserve.disagg.bootstrap_server import BootstrapServer
    from meshserve.server.metrics import ServerMetrics
    from meshserve.server.tokenizer_manager import TokenizerManager

log = logging.getLogger("meshserve")


class StartupError(RuntimeError):
    """The node cannot start; the message is the one line the user reads."""


def model_dir(args: ServerArgs) -> str:
    """``--model-path``, or the default model's directory (converted from its GGUF on first use)."""
    if args.model.model_path is not None:
        return args.model.model_path
    from meshserve.config.default_model import default_model_path

    return str(default_model_path())


def preflight(args: ServerArgs) -> None:
    """The model directory against the arguments, from config.json as plain JSON and before
    torch is imported: a wrong --model-path or --tp is told in a second."""
    from meshserve.cluster.topology import layout_from_args
    from meshserve.config.default_model import DefaultModelUnavailable
    from meshserve.config.preflight import ModelDirError, check_model_dir

    try:
        check_model_dir(model_dir(args), args.parallel.tp_size, layout_from_args(args).attn_tp_size,
                        args.parallel.ep_size)
    except (ModelDirError, DefaultModelUnavailable) as err:
        raise StartupError(f"cannot start: {err}") from None


def _model_config(args: ServerArgs) -> ModelConfig:
    from meshserve.config.model_config import ModelConfig

    try:
        return ModelConfig.from_server_args(args)
    except (ValueError, OSError) as err:  # ModelConfigError is a ValueError
        raise StartupError(f"cannot start: {err}") from None


def _tokenizer(args: ServerArgs, model_config: ModelConfig) -> PreTrainedTokenizerBase | None:
    """Node 0's tokenizer (None on other nodes, which never see text)."""
    if args.parallel.node_rank != 0:
        return None
    from meshserve.server.tokenizer_manager import load_tokenizer

    try:
        return load_tokenizer(model_config.tokenizer_path)
    except (OSError, ValueError) as err:
        raise StartupError(f"cannot load the tokenizer from {model_config.tokenizer_path}: {err}") from None


def open_disaggregation(args: ServerArgs) -> BootstrapServer | None:
    """PD start-up checks (named RDMA devices exist) and, on a prefill server's node 0, the
    bootstrap server, bound now (a busy port fails at once) and serving before any rank starts,
    since the ranks register there."""
    d = args.disagg
    if d.disaggregation_mode == "null":
        return None
    from meshserve.disagg.transfer import check_ib_devices

    check_ib_devices(d.disaggregation_ib_device.split(",") if d.disaggregation_ib_device else None)
    if d.disaggregation_mode != "prefill" or args.parallel.node_rank != 0:
        return None
    from meshserve.disagg.bootstrap_server import BootstrapServer

    server = BootstrapServer(args.http.host, d.disaggregation_bootstrap_port)
    server.start()
    return server


@contextlib.contextmanager
def spawn_without_main() -> Iterator[None]:
    """Start `spawn` children without the caller's `__main__`.

    multiprocessing's spawn re-imports the parent's main script (or `-m` module) in each child,
    so a plain script that builds an Engine at top level, without an `if __name__ ==
    "__main__":` guard, would build another Engine inside the child and fail. The scheduler's
    entry point and arguments all live in meshserve, so the child needs nothing from
    `__main__`: while the children start, `__main__` is a bare module with no file and no spec,
    which spawn skips. The user's module object itself is never touched."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


@dataclass
class NodeRuntime:
    """One started node: its cluster membership and its scheduler ranks (watched: the first to
    end is reported to the cluster); node 0 also holds the tokenizer and the scheduler
    connection's addresses."""

    args: ServerArgs
    model_config: ModelConfig
    cluster: ClusterNode
    processes: SchedulerProcesses
    tokenizer: PreTrainedTokenizerBase | None
    bootstrap: BootstrapServer | None

    @property
    def leader(self) -> bool:
        return self.args.parallel.node_rank == 0

    @classmethod
    def start(cls, args: ServerArgs) -> NodeRuntime:
        """Blocking (waits for every node, spawns the ranks, loads the tokenizer). Call
        preflight(args) first where a fast refusal matters.

        On one node nothing needs the model's config (transformers, torch) before the ranks
        start, so they start first: their imports and weight loads overlap this process's
        imports, config and tokenizer (on an idle 2-core machine the default model then serves
        in 5.4-6.6 s instead of 11.4 s). Across nodes the coordinator's handshake compares the config, so it is
        read first, and node 0's tokenizer too: a broken tokenizer is told before any node waits."""
        from meshserve.cluster.coordinator import ClusterError
        from meshserve.cluster.launcher import launch_schedulers
        from meshserve.cluster.net import NetError
        from meshserve.cluster.node import ClusterNode
        from meshserve.cluster.topology import Topology, layout_from_args

        try:
            cluster = ClusterNode(args)
            bootstrap = open_disaggregation(args)
        except (ValueError, OSError) as err:  # PortPlanError is a ValueError
            raise StartupError(f"cannot start: {err}") from None
        with contextlib.ExitStack() as undo:
            if bootstrap is not None:
                undo.callback(bootstrap.close)
            model_config: ModelConfig | None = None
            tokenizer: PreTrainedTokenizerBase | None = None
            if args.parallel.nnodes > 1:
                model_config = _model_config(args)
                tokenizer = _tokenizer(args, model_config)
            try:
                cluster.start(model_config)
                endpoints = cluster.scheduler_endpoints(Topology.from_args(args))
            except (ClusterError, NetError, ValueError, OSError) as err:
                cluster.shutdown(clean=False, reason=str(err))
                raise StartupError(f"cannot join the cluster: {err}") from None
            log.info("starting %d scheduler rank(s) on this node: each imports torch, loads its weights, sizes its "
                     "KV cache", layout_from_args(args).world_size // args.parallel.nnodes)
            try:
                with spawn_without_main():
                    processes = launch_schedulers(args, cluster.rendezvous, endpoints)
            except Exception as err:  # noqa: BLE001 - one line for the user, the traceback at debug level
                log.debug("scheduler start-up failure", exc_info=True)
                cluster.shutdown(clean=False, reason=f"node {args.parallel.node_rank} could not start its ranks")
                raise StartupError(f"cannot start the scheduler processes: {type(err).__name__}: {err}") from None
            # Undone last in, first out: the ranks stop (unwatched) before the cluster goes.
            undo.callback(cluster.shutdown, clean=False, reason=f"node {args.parallel.node_rank} could not start")
            undo.callback(processes.shutdown)
            cluster.watch_ranks(processes)
            if model_config is None:
                log.info("loading torch, transformers and the tokenizer while the ranks start")
                model_config = _model_config(args)
                tokenizer = _tokenizer(args, model_config)
            undo.pop_all()
        return cls(args, model_config, cluster, processes, tokenizer, bootstrap)

    def tokenizer_manager(self, metrics: ServerMetrics | None = None) -> TokenizerManager:
        """Node 0's side of the scheduler connection (not started)."""
        from meshserve.server.tokenizer_manager import TokenizerManager

        assert self.leader and self.processes.endpoints is not None, "only node 0 talks to the scheduler"
        return TokenizerManager(
            self.tokenizer,
            endpoints=self.processes.endpoints,
            scheduler_dead=self.processes.dead,
            load_balance_method=self.args.parallel.load_balance_method,
            metrics=metrics,
            disaggregation_mode=self.args.disagg.disaggregation_mode,
        )

    def shutdown(self, *, clean: bool, exit_code: int | None = None) -> None:
        """Stop this node. Node 0 stopping (cleanly or not) stops every node; the ranks are
        joined before this returns. Idempotent. After a failure the last log line names the
        cause, and the process's exit code where the caller has one (launch_server)."""
        if self.leader:
            self.cluster.shutdown(clean=clean, reason="node 0 is shutting down")
        self.processes.shutdown()
        if self.bootstrap is not None:
            self.bootstrap.close()
            self.bootstrap = None
        if not clean and (problem := self.cluster.problem()):
            leaves = "stops" if exit_code is None else f"exits with code {exit_code}"
            log.error("node %d %s: %s", self.args.parallel.node_rank, leaves, problem)
