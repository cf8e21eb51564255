"""`python -m meshserve.launch_server ARGS`: serve one model over HTTP (SGLang's command line).

Start-up order on every node: parse and validate the arguments, check the model directory
against them (config.json as plain JSON, before torch is imported), resolve the model, bind the
HTTP port (a busy port fails at once, not after the model loaded), load the tokenizer (node 0),
join the cluster (port plan, interface, rendezvous store, coordinator handshake — a mismatched
or missing node is named here, before any rank can hang in a collective), start this node's
scheduler ranks, then serve: node 0 the API, other nodes /health and /metrics. Any start-up
failure exits non-zero with a one-line reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

from meshserve.config.server_args import ServerArgs

if TYPE_CHECKING:
    from meshserve.disagg.bootstrap_server import BootstrapServer

log = logging.getLogger("meshserve")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def model_dir(args: ServerArgs) -> str:
    """``--model-path``, or the default model's directory (converted from its GGUF on first use)."""
    if args.model.model_path is not None:
        return args.model.model_path
    from meshserve.config.default_model import default_model_path

    return str(default_model_path())


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


def main(argv: Sequence[str] | None = None) -> int:
    args = ServerArgs.from_cli(argv)  # exits 2 with "error: ..." lines on bad arguments
    configure_logging(args.http.log_level)

    # Before torch, transformers or any rank: a wrong --model-path or --tp is told in a second.
    from meshserve.config.default_model import DefaultModelUnavailable
    from meshserve.cluster.topology import layout_from_args
    from meshserve.config.preflight import ModelDirError, check_model_dir

    try:
        check_model_dir(model_dir(args), args.parallel.tp_size, layout_from_args(args).attn_tp_size)
    except (ModelDirError, DefaultModelUnavailable) as err:
        log.error("cannot start: %s", err)
        return 1

    from meshserve.server.http_probes import quiet_probe_access_logs

    quiet_probe_access_logs()
    log.info("loading torch and transformers")
    for note in args.without_effect():
        log.warning("%s", note)
    from meshserve.cluster.coordinator import ClusterError
    from meshserve.cluster.launcher import launch_schedulers
    from meshserve.cluster.net import NetError
    from meshserve.cluster.node import ClusterNode
    from meshserve.config.model_config import ModelConfig
    from meshserve.server.http_server import bind_http_socket, serve
    from meshserve.server.node_agent import NodeAgent
    from meshserve.server.tokenizer_manager import load_tokenizer

    leader = args.parallel.node_rank == 0
    try:
        model_config = ModelConfig.from_server_args(args)
        cluster = ClusterNode(args, model_config)
        sock = bind_http_socket(args.http.host, args.http.port)
        bootstrap = open_disaggregation(args)
    except (ValueError, OSError) as err:  # ModelConfigError and PortPlanError are ValueErrors
        log.error("cannot start: %s", err)
        return 1
    with sock, contextlib.closing(bootstrap) if bootstrap is not None else contextlib.nullcontext():
        tokenizer = None
        if leader:
            try:
                tokenizer = load_tokenizer(model_config.tokenizer_path)
            except (OSError, ValueError) as err:
                log.error("cannot load the tokenizer from %s: %s", model_config.tokenizer_path, err)
                return 1
        try:
            cluster.start()
        except (ClusterError, NetError, ValueError, OSError) as err:
            log.error("cannot join the cluster: %s", err)
            cluster.shutdown(clean=False, reason=str(err))
            return 1
        log.info("starting %d scheduler rank(s) on this node: each imports torch, loads its weights, sizes its "
                 "KV cache", layout_from_args(args).world_size // args.parallel.nnodes)
        try:
            processes = launch_schedulers(args, cluster.rendezvous)
        except Exception as err:  # noqa: BLE001 - one line for the user, the traceback at debug level
            log.error("cannot start the scheduler processes: %s: %s", type(err).__name__, err,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            cluster.shutdown(clean=False, reason=f"node {args.parallel.node_rank} could not start its ranks")
            return 1
        cluster.watch_ranks(processes)
        code = 1
        try:
            if leader:
                code = asyncio.run(serve(args, model_config, tokenizer, processes, sock, cluster))
            else:
                code = asyncio.run(NodeAgent(args, cluster, processes, sock).run())
            return code
        except KeyboardInterrupt:  # Ctrl-C before the server installed its handlers
            code = 130
            return code
        finally:
            # Node 0 stopping on purpose stops every node cleanly; a failure has been reported already.
            if leader:
                cluster.shutdown(clean=code == 0, reason="node 0 is shutting down")
            processes.shutdown()
            if code != 0 and (problem := cluster.problem()):
                log.error("node %d exits with code %d: %s", args.parallel.node_rank, code, problem)


def run(argv: Sequence[str] | None = None) -> NoReturn:
    """main(), then leave without the interpreter's teardown. By then every scheduler process
    has been joined, every socket closed, and the logs are flushed here; what remains is
    finalising torch and friends, measured at 2-3 s on a loaded 2-core machine (most of a
    SIGTERM's exit time), for nothing."""
    code = main(argv)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
