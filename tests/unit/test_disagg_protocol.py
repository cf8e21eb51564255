"""The PD protocol's parts without a model: the bootstrap server and its clients over real HTTP
on 127.0.0.1, the control channel over real ZMQ sockets, and the layout diff."""

from __future__ import annotations

import time

import httpx
import msgspec
import pytest
import zmq

from meshserve.disagg.bootstrap_client import Prefill, PrefillDirectory, register_rank
from meshserve.disagg.bootstrap_server import BootstrapServer
from meshserve.disagg.control import ControlChannel
from meshserve.disagg.protocol import (KVAck, KVDone, KVFailed, KVLayout, Registration, prefill_dp_rank,
                                       prompt_digest)
from meshserve.messages import TopLogprob
from tests.server_process import free_port

LAYOUT = KVLayout(model="config.json abc, weights def, tokenizer 123", dtype="float32", num_layers=30,
                  kv_heads=3, head_dim=64, page_size=1, tp_size=1)


def _wait(directory: PrefillDirectory, host: str, port: int, room: int = 0) -> Prefill | Exception:
    deadline = time.monotonic() + 10
    while (found := directory.get(host, port, room)) is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return found


def test_layout_diff_names_every_field_that_differs() -> None:
    other = msgspec.structs.replace(LAYOUT, dtype="bfloat16", page_size=16)
    assert LAYOUT.diff(other, mine="prefill", theirs="decode") == [
        "dtype: prefill has float32, decode has bfloat16", "page_size: prefill has 1, decode has 16"]
    assert LAYOUT.diff(LAYOUT, mine="prefill", theirs="decode") == []


def test_pairing_allows_a_decode_tp_that_splits_the_prefill_heads() -> None:
    prefill = msgspec.structs.replace(LAYOUT, kv_heads=4, tp_size=1)
    split = msgspec.structs.replace(LAYOUT, kv_heads=2, tp_size=2)
    assert prefill.pairing_problems(split) == [] and prefill.fanout(split) == 2
    assert prefill.pairing_problems(prefill) == []
    # tp 1 -> 3 cannot split 4 heads; tp 2 -> 1 would need merging; replicated heads are not split
    for decode in (msgspec.structs.replace(LAYOUT, kv_heads=1, tp_size=3), msgspec.structs.replace(LAYOUT, kv_heads=4),
                   msgspec.structs.replace(LAYOUT, kv_heads=4, tp_size=8)):
        [line] = msgspec.structs.replace(prefill, tp_size=2 if decode.tp_size == 1 else 1).pairing_problems(decode)
        assert line.startswith("tp_size: prefill has"), line
    assert msgspec.structs.replace(LAYOUT, kv_heads=2).pairing_problems(LAYOUT) == [
        "kv_heads: prefill has 2, decode has 3"]


def test_prompt_digest_tells_prompts_apart() -> None:
    assert prompt_digest([1, 2, 3]) == prompt_digest([1, 2, 3]) != prompt_digest([1, 2, 4])


def test_bootstrap_server_registers_and_routes_with_the_compatibility_check() -> None:
    port = free_port()
    server = BootstrapServer("127.0.0.1", port)
    server.start()
    try:
        directory = PrefillDirectory(msgspec.structs.replace(LAYOUT, head_dim=128), tp_rank=0)
        missing = _wait(directory, "127.0.0.1", port)
        assert isinstance(missing, RuntimeError) and "answered 404" in str(missing)  # not registered yet
        register_rank("127.0.0.1", port, Registration(tp_rank=0, endpoint="tcp://127.0.0.1:1", metadata=b"\x00md",
                                                      layout=LAYOUT))
        found = _wait(directory, "127.0.0.1", port)  # a failed lookup is not cached: asked again
        assert found == Prefill(endpoint="tcp://127.0.0.1:1", metadata=b"\x00md",
                                problems=("head_dim: prefill has 64, decode has 128",))
        assert directory.get("127.0.0.1", port, 0) is found  # cached per address
        # Plain JSON, readable with curl; a body that is not a Registration is refused.
        assert httpx.get(f"http://127.0.0.1:{port}/route?tp_rank=0").json()["endpoint"] == "tcp://127.0.0.1:1"
        assert httpx.put(f"http://127.0.0.1:{port}/register", content=b'{"tp_rank": "x"}').status_code == 400
        directory.close()
    finally:
        server.close()


def test_a_room_finds_its_prefill_dp_group() -> None:
    """A prefill with --dp-size 2 (attention TP 2 in each group): decode rank 1 of a room pairs
    with rank 1 of DP group room % 2, the group the prefill's DPController gave the room to."""
    port = free_port()
    server = BootstrapServer("127.0.0.1", port)
    server.start()
    layout = msgspec.structs.replace(LAYOUT, tp_size=2)
    directory = PrefillDirectory(layout, tp_rank=1)
    try:
        for group, rank in ((0, 0), (0, 1), (1, 0)):
            register_rank("127.0.0.1", port, Registration(tp_rank=rank, dp_rank=group, dp_size=2, layout=layout,
                                                          endpoint=f"tcp://127.0.0.1:{10 * group + rank + 1}",
                                                          metadata=b""))
        missing = _wait(directory, "127.0.0.1", port)
        assert isinstance(missing, RuntimeError) and "prefill tp rank 1 of DP group 1 has not registered" in str(missing)
        register_rank("127.0.0.1", port, Registration(tp_rank=1, dp_rank=1, dp_size=2, layout=layout,
                                                      endpoint="tcp://127.0.0.1:12", metadata=b""))
        assert [_wait(directory, "127.0.0.1", port, room).endpoint for room in (6, 7, 2**63 - 1)] == [
            "tcp://127.0.0.1:2", "tcp://127.0.0.1:12", "tcp://127.0.0.1:12"]
        assert prefill_dp_rank(7, 2) == 1 and prefill_dp_rank(6, 2) == 0
    finally:
        directory.close()
        server.close()


def test_an_unreachable_bootstrap_server_is_an_error_not_a_hang() -> None:
    directory = PrefillDirectory(LAYOUT, tp_rank=0)
    found = _wait(directory, "127.0.0.1", free_port())
    assert isinstance(found, RuntimeError) and "cannot reach the PD bootstrap server" in str(found)
    directory.close()


def test_a_busy_bootstrap_port_fails_by_name() -> None:
    port = free_port()
    first = BootstrapServer("127.0.0.1", port)
    try:
        with pytest.raises(OSError, match="--disaggregation-bootstrap-port"):
            BootstrapServer("127.0.0.1", port)
    finally:
        first.close()


def test_control_channel_carries_typed_messages_and_drops_malformed_ones() -> None:
    a, b = ControlChannel("127.0.0.1", "127.0.0.1"), ControlChannel("127.0.0.1", "127.0.0.1")
    try:
        assert b.endpoint.startswith("tcp://127.0.0.1:")
        sent = [KVDone(room=2**63 - 1, token=5, logprob=-0.5, top_logprobs=[TopLogprob(5, -0.5)]),
                KVFailed(7, "no"), KVAck(7)]
        for msg in sent:
            a.send(b.endpoint, msg)
        raw = zmq.Context.instance().socket(zmq.PUSH)  # a stranger: pickle-like junk is dropped
        raw.connect(b.endpoint)
        raw.send(b"\x80\x04junk")
        received: list = []
        deadline = time.monotonic() + 5
        while len(received) < len(sent) and time.monotonic() < deadline:
            received += b.receive()
            time.sleep(0.01)
        assert received == sent
        raw.close(linger=0)
    finally:
        a.close()
        b.close()
