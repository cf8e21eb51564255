"""The prefill-decode protocol's messages, as msgspec Structs (msgpack on the control channel,
JSON at the bootstrap server; never pickle: a peer's bytes can only decode into these fields).

  prefill rank -> bootstrap server   Registration (PUT /register), read back by decode ranks
  decode -> prefill                  KVRequest: "write room R's prompt KV into these slots of mine"
  prefill -> decode                  KVDone (the write ended, here is the first token) or KVFailed
  decode -> prefill                  KVAck: the prefill may now free the room's KV

A room is the 64-bit id the router gives both halves of one request (Bootstrap.room).
"""

from __future__ import annotations

import hashlib

import msgspec

from meshserve.messages import TopLogprob


class KVLayout(msgspec.Struct, frozen=True, kw_only=True):
    """What must match between a prefill rank and a decode rank for one's KV bytes to mean the
    same in the other's pool. `model` identifies the weights, config and tokenizer files."""

    model: str
    dtype: str
    num_layers: int
    kv_heads: int  # per rank
    head_dim: int
    page_size: int
    tp_size: int

    def diff(self, other: KVLayout, *, mine: str, theirs: str) -> list[str]:
        """One line per field that differs, e.g. `dtype: prefill has bfloat16, decode has float32`."""
        return [f"{name}: {mine} has {getattr(self, name)}, {theirs} has {getattr(other, name)}"
                for name in self.__struct_fields__ if getattr(self, name) != getattr(other, name)]


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    """A prefill rank, as decode ranks find it at the bootstrap server."""

    tp_rank: int
    endpoint: str  # the rank's control socket, tcp://host:port
    metadata: bytes  # its transfer backend's local_metadata()
    layout: KVLayout


class KVRequest(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    """Decode asks for room `room`'s prompt KV: token i goes to slot slots[i] of each of its
    buffers `bases` (items of `item_bytes`). `prompt_digest` guards against the two halves
    having tokenized different prompts (the KV would be silently wrong)."""

    room: int
    endpoint: str  # where KVDone / KVFailed go
    metadata: bytes  # the decode rank's transfer backend metadata
    bases: list[int]
    item_bytes: int
    slots: list[int]
    prompt_digest: bytes
    layout: KVLayout


class KVDone(msgspec.Struct, tag=True, frozen=True, kw_only=True):
    """The write into the decode's slots ended successfully; the first token came with it."""

    room: int
    token: int
    logprob: float | None = None
    top_logprobs: list[TopLogprob] = []


class KVFailed(msgspec.Struct, tag=True, frozen=True):
    """The prefill gave up on room `room`; no write of it is in flight any more."""

    room: int
    reason: str


class KVAck(msgspec.Struct, tag=True, frozen=True):
    """The decode holds room `room`'s KV (or gave it up); the prefill frees its copy."""

    room: int


ControlMessage = KVRequest | KVDone | KVFailed | KVAck


def prompt_digest(input_ids: list[int]) -> bytes:
    return hashlib.blake2b(msgspec.msgpack.encode(input_ids), digest_size=16).digest()
