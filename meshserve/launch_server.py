"""`python -m meshserve.launch_server ARGS`: serve one model over HTTP (SGLang's command line).

Start-up order on every node: parse and validate the arguments, check the model directory
against them (config.json as plain JSON, before torch is imported), bind the HTTP port (a busy
port fails at once, not after the model loaded), then start the node as every front end does
(meshserve/runtime.py): join the cluster (port plan, interface, rendezvous store; across nodes,
after reading the model's config and node 0's tokenizer, the coordinator handshake — a
mismatched or missing node is named here, before any rank can hang in a collective), start this
node's scheduler ranks (on one node, the config and tokenizer are read while they start), then
serve: node 0 the API, other nodes /health and /metrics. Any start-up failure exits non-zero
with a one-line reason.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import uvloop

from meshserve.config.server_args import ServerArgs

log = logging.getLogger("meshserve")


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: Sequence[str] | None = None) -> int:
    args = ServerArgs.from_cli(argv)  # exits 2 with "error: ..." lines on bad arguments
    configure_logging(args.http.log_level)
    from meshserve.runtime import NodeRuntime, StartupError, preflight

    try:
        preflight(args)
    except StartupError as err:
        log.error("%s", err)
        return 1

    from meshserve.server.http_socket import bind_http_socket

    for note in args.without_effect():
        log.warning("%s", note)
    try:
        sock = bind_http_socket(args.http.host, args.http.port)
    except OSError as err:
        log.error("cannot start: %s", err)
        return 1
    with sock:
        try:
            runtime = NodeRuntime.start(args)  # the one assembly, shared with the engines
        except StartupError as err:
            log.error("%s", err)
            return 1
        from meshserve.server.http_probes import quiet_probe_access_logs
        from meshserve.server.http_server import serve
        from meshserve.server.node_agent import NodeAgent

        quiet_probe_access_logs()
        code = 1
        try:
            # uvloop's event loop: 7-11 % less of the main process's CPU per streamed token than
            # asyncio's own (docs/benchmarks.md), the loop SGLang and vLLM serve on too.
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                if runtime.leader:
                    code = runner.run(serve(runtime, sock))
                else:
                    code = runner.run(NodeAgent(args, runtime.cluster, runtime.processes, sock).run())
            return code
        except KeyboardInterrupt:  # Ctrl-C before the server installed its handlers
            code = 130
            return code
        finally:
            # Node 0 stopping on purpose stops every node cleanly; a failure has been reported already.
            runtime.shutdown(clean=code == 0, exit_code=code)


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
