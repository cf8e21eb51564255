"""The HTTP listening socket: connections accepted from it have TCP_NODELAY, so a stream's events
leave as they are written. (With socket.create_server's protocol 0, asyncio leaves Nagle's
algorithm on: each stream's first event waited for the client's delayed ACK of the response
headers, ~40 ms, and about half of the first tokens at concurrency 1 arrived ~32 ms late.)"""

from __future__ import annotations

import asyncio
import socket

import pytest

from meshserve.server.http_socket import bind_http_socket


def test_accepted_connections_have_tcp_nodelay():
    listener = bind_http_socket("127.0.0.1", 0)

    async def accepted_nodelay() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connection, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            try:
                return await asyncio.wait_for(accepted, 10)
            finally:
                writer.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_a_busy_port_is_refused_at_once():
    with bind_http_socket("127.0.0.1", 0) as first, pytest.raises(OSError):
        bind_http_socket("127.0.0.1", first.getsockname()[1])
