"""ControlChannel: a scheduler rank's ZMQ link to the ranks of the other half of PD.

One PULL socket bound on the host given (never all interfaces) receives every ControlMessage;
one PUSH socket per peer endpoint sends. Sends never block the step loop: a message to a peer
whose queue is full (dead or stuck) is dropped, and the room's deadline ends the wait that it
would have ended.
"""

from __future__ import annotations

import logging

import msgspec
import zmq

from meshserve.disagg.protocol import ControlMessage

logger = logging.getLogger("meshserve")

SEND_HWM = 10_000  # messages queued per peer before sends are dropped


class ControlChannel:
    def __init__(self, bind_host: str, advertised_host: str) -> None:
        """Listen on bind_host (the server's --host); peers are told advertised_host."""
        self._ctx = zmq.Context()
        self._inbox = self._ctx.socket(zmq.PULL)
        self._inbox.setsockopt(zmq.LINGER, 0)
        if ":" in bind_host:
            self._inbox.setsockopt(zmq.IPV6, 1)
        port = self._inbox.bind_to_random_port(f"tcp://{_bracketed(bind_host)}")
        self.endpoint = f"tcp://{_bracketed(advertised_host)}:{port}"
        self._peers: dict[str, zmq.Socket] = {}
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(ControlMessage)

    def receive(self) -> list[ControlMessage]:
        """Everything queued now, without waiting; malformed messages are logged and dropped."""
        messages = []
        while True:
            try:
                data = self._inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return messages
            try:
                messages.append(self._decoder.decode(data))
            except msgspec.DecodeError as exc:
                logger.warning("PD control: dropped a malformed message: %s", exc)

    def send(self, endpoint: str, msg: ControlMessage) -> None:
        sock = self._peers.get(endpoint)
        if sock is None:
            sock = self._peers[endpoint] = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, SEND_HWM)
            if endpoint.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            sock.connect(endpoint)
        try:
            sock.send(self._encoder.encode(msg), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("PD control: %s is not taking messages; dropped %s for room %d",
                           endpoint, type(msg).__name__, msg.room)

    def close(self) -> None:
        self._ctx.destroy(linger=0)


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
