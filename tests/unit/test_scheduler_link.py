"""The scheduler link over real sockets: ZMQ messages between a node-0 Unix socket and a
"node 1" client pass through the relay and the authenticated gate both ways, in order; a peer
without the cluster secret or naming no real socket reaches nothing."""

from __future__ import annotations

import logging
import socket
import time

import msgspec
import pytest
import zmq

from meshserve.cluster.auth import AuthError, ClusterSecret
from meshserve.cluster.endpoints import SchedulerEndpoints
from meshserve.cluster.frames import PeerClosed, pack_frame, recv_frame
from meshserve.cluster.scheduler_link import LinkTarget, SchedulerLink
from tests.cluster_nodes import base_port

SECRET = ClusterSecret(b"0123456789abcdef-link", "test")
TIMEOUT_MS = 10_000


@pytest.fixture
def link() -> tuple[SchedulerEndpoints, SchedulerLink, SchedulerLink]:
    endpoints = SchedulerEndpoints.new_ipc(dp_size=3)
    port = base_port() + 2
    gate = SchedulerLink.serve(endpoints, "127.0.0.1", port, SECRET)
    relay = SchedulerLink.relay("127.0.0.1", port, SECRET, dp_ranks=[2], dp_size=3)
    yield endpoints, gate, relay
    relay.close()
    gate.close()


def _socket(ctx: zmq.Context, kind: int) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, TIMEOUT_MS)
    return sock


def test_messages_cross_both_ways_in_order(link) -> None:
    endpoints, _, relay = link
    assert relay.endpoints.to_scheduler[:2] == (None, None)  # groups 0 and 1 lead elsewhere
    assert relay.endpoints.inbox(2).startswith("tcp://127.0.0.1:")
    with pytest.raises(ValueError, match="DP group 0's leader runs on another node"):
        relay.endpoints.inbox(0)
    ctx = zmq.Context()
    try:
        # Node 1's leader connects first, before node 0's main process binds: ZMQ retries.
        inbox, outbox = _socket(ctx, zmq.PULL), _socket(ctx, zmq.PUSH)
        inbox.connect(relay.endpoints.inbox(2))
        outbox.connect(relay.endpoints.from_scheduler)
        push, pull = _socket(ctx, zmq.PUSH), _socket(ctx, zmq.PULL)
        push.bind(endpoints.inbox(2))
        pull.bind(endpoints.from_scheduler)
        for i in range(50):
            push.send(b"request %d" % i)
            outbox.send(b"output %d" % i)
        assert [inbox.recv() for _ in range(50)] == [b"request %d" % i for i in range(50)]
        assert [pull.recv() for _ in range(50)] == [b"output %d" % i for i in range(50)]
    finally:
        ctx.destroy(linger=0)


def test_strangers_and_bad_targets_reach_nothing(link, caplog: pytest.LogCaptureFixture) -> None:
    _, gate, _ = link
    port = gate._listeners[0].getsockname()[1]
    stranger = ClusterSecret(b"0123456789abcdef-other", "test")
    caplog.set_level(logging.WARNING, logger="meshserve")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock, pytest.raises(AuthError):
        stranger.connect(sock, b"scheduler-link")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        SECRET.connect(sock, b"scheduler-link")
        sock.sendall(pack_frame(b"\x92\x01\x02"))  # msgpack, but no LinkTarget
        with pytest.raises(PeerClosed):
            recv_frame(sock, 16)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        SECRET.connect(sock, b"scheduler-link")
        sock.sendall(pack_frame(msgspec.msgpack.encode(LinkTarget(7))))  # no DP group 7
        with pytest.raises(PeerClosed):
            recv_frame(sock, 16)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(_dropped(caplog)) < 3:
        time.sleep(0.05)
    assert len(_dropped(caplog)) == 3, caplog.text


def _dropped(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "scheduler-link-gate dropped a connection" in r.getMessage()]


def test_the_relay_sends_small_messages_at_once() -> None:
    """Both TCP ends of a relayed connection have TCP_NODELAY: with Nagle's algorithm a small
    message behind an unacknowledged one waits for the peer's delayed ACK (~40 ms)."""
    from meshserve.cluster.tunnel import Forwarder, listen

    target = listen("127.0.0.1", 0)
    ends: list[socket.socket] = []

    def open_upstream(conn: socket.socket) -> socket.socket:
        upstream = socket.create_connection(target.getsockname()[:2])
        ends.extend([conn, upstream])
        return upstream

    listener = listen("127.0.0.1", 0)
    Forwarder(listener, open_upstream, "test").start()
    client = socket.create_connection(listener.getsockname()[:2])
    accepted, _ = target.accept()
    try:
        client.sendall(b"ping")
        assert accepted.recv(4) == b"ping"  # piping has begun: the ends are set up
        assert len(ends) == 2
        assert all(end.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for end in ends)
    finally:
        for sock in (client, accepted, listener, target):
            sock.close()
