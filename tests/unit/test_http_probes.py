"""Probe logging and error shapes shared by node 0's API and the node agent of nodes r > 0."""

from __future__ import annotations

import logging

from fastapi.testclient import TestClient

from meshserve.config.server_args import ServerArgs
from meshserve.server.http_probes import ProbeAccessFilter
from meshserve.server.node_agent import NodeAgent
from tests.app_routes import build_app


def access_record(path: str) -> logging.LogRecord:
    # The shape of uvicorn.access records: (client, method, path, http version, status).
    return logging.LogRecord("uvicorn.access", logging.INFO, __file__, 0, '%s - "%s %s HTTP/%s" %d',
                             ("127.0.0.1:5", "GET", path, "1.1", 200), None)


def test_probe_access_lines_only_at_debug() -> None:
    access, level = logging.getLogger("uvicorn.access"), logging.getLogger("uvicorn.access").level
    try:
        access.setLevel(logging.INFO)
        probe_filter = ProbeAccessFilter()
        assert not probe_filter.filter(access_record("/health"))
        assert not probe_filter.filter(access_record("/metrics?x=1"))
        assert probe_filter.filter(access_record("/v1/models"))
        access.setLevel(logging.DEBUG)
        assert probe_filter.filter(access_record("/health"))
    finally:
        access.setLevel(level)


def test_node_agent_answers_unknown_routes_like_node_0() -> None:
    agent = NodeAgent(ServerArgs(), cluster=None, processes=None, sock=None)  # type: ignore[arg-type]
    node_r = TestClient(agent.server.config.app).get("/v1/chat/completions")
    node_0 = TestClient(build_app(None)).get("/no/such/route")
    assert node_r.status_code == node_0.status_code == 404
    assert node_r.json() == node_0.json()
    assert set(node_r.json()["error"]) >= {"message", "type", "code"}
