"""The HTTP side of a node other than 0: no API (only node 0 serves it), but a truthful
/health and /metrics, and the watch over this node's ranks.

/health is 200 only while every local rank is alive and the cluster is whole. A local rank's
end is reported by the launcher's watch (ClusterNode.watch_ranks) the moment it happens; the
cluster then stops every node with one reason (this node exits non-zero), and a clean stop
from node 0 makes it exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from meshserve.cluster.launcher import SchedulerProcesses
from meshserve.cluster.node import ClusterNode
from meshserve.config.server_args import ServerArgs
from meshserve.server.http_probes import H2ProbeTolerantProtocol
from meshserve.server.http_server import UvicornServer, http_error
from meshserve.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = logging.getLogger("meshserve")


class NodeAgent:
    def __init__(self, args: ServerArgs, cluster: ClusterNode, processes: SchedulerProcesses,
                 sock: socket.socket) -> None:
        self.args = args
        self.cluster = cluster
        self.processes = processes
        self.sock = sock
        self.exit_code = 0
        self.registry = CollectorRegistry()
        self._whole = Gauge("meshserve:cluster_whole", "1 while every node and rank is up", registry=self.registry)
        self._alive = Gauge("meshserve:local_ranks_alive", "scheduler ranks alive on this node",
                            registry=self.registry)
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        app.get("/health")(self._health)
        app.get("/metrics")(self._metrics)
        app.add_exception_handler(StarletteHTTPException, http_error)  # node 0's error shape
        self.server = UvicornServer(uvicorn.Config(app, log_level=args.http.log_level, log_config=None,
                                                   lifespan="off", http=H2ProbeTolerantProtocol))

    def problem(self) -> str | None:
        return self.processes.dead() or self.cluster.problem()

    async def _health(self) -> Response:
        problem = self.problem()
        if problem is None:
            return Response(status_code=200)
        return JSONResponse({"error": {"message": f"not ready: {problem}", "type": "service_unavailable"}},
                            status_code=503)

    async def _metrics(self) -> Response:
        self._whole.set(0 if self.problem() else 1)
        self._alive.set(sum(p.is_alive() for p in self.processes.processes))
        return Response(generate_latest(self.registry), media_type=METRICS_CONTENT_TYPE)

    def stop(self, reason: str, exit_code: int) -> None:
        if self.server.should_exit:
            return
        (log.error if exit_code else log.info)("node %d stopping: %s", self.args.parallel.node_rank, reason)
        self.exit_code = exit_code
        self.server.should_exit = True

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.cluster.on_failure(lambda reason, clean: loop.call_soon_threadsafe(
            self.stop, f"cluster {'stop' if clean else 'failure'}: {reason}", 0 if clean else 1))
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        log.info("node %d: ranks started; /health and /metrics on %s:%d", self.args.parallel.node_rank,
                 self.args.http.host, self.args.http.port)
        await self.server.serve(sockets=[self.sock])
        return self.exit_code

    def _on_signal(self, sig: signal.Signals) -> None:
        # A node leaving makes the cluster unable to serve: the others stop too (non-zero).
        # The coordinator's goodbye waits (bounded) for node 0 to read it: not on the loop.
        self.stop(f"received {sig.name}", 0)
        asyncio.get_running_loop().run_in_executor(None, lambda: self.cluster.shutdown(
            clean=False, reason=f"node {self.args.parallel.node_rank} received {sig.name}"))
