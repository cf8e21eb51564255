"""The prefill-decode protocol's messages, as msgspec Structs (msgpack on the control channel,
JSON at the bootstrap server; never pickle: a peer's bytes can only decode into these fields).

  prefill rank -> bootstrap server   Registration (PUT /register), read back by decode ranks
  decode -> prefill                  KVRequest: "write room R's prompt KV into these slots of mine"
  prefill -> decode                  KVDone (the write ended, here is the first token) or KVFailed
  decode -> prefill                  KVAck: the prefill may now free the room's KV

A room is the 64-bit id the router gives both halves of one request (Bootstrap.room). With
--dp-size on the prefill server, room r runs in (and its KV stays in) the prefill's DP group
`prefill_dp_rank(r, dp_size)`; the decode finds that group's ranks at the bootstrap server.
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
    kv_scales: str = "none"  # an FP8 pool's per-layer K/V scales (KVPool.scales_digest): stored bytes * scale


    def diff(self, other: KVLayout, *, mine: str, theirs: str, fields: tuple[str, ...] | None = None) -> list[str]:
        """One line per field that differs, e.g. `dtype: prefill has bfloat16, decode has float32`."""
        return [f"{name}: {mine} has {getattr(self, name)}, {theirs} has {getattr(other, name)}"
                for name in fields or self.__struct_fields__ if getattr(self, name) != getattr(other, name)]

    def pairing_problems(self, decode: KVLayout) -> list[str]:
        """Why this prefill layout cannot feed `decode`'s (empty when it can). The tensor-parallel
        sizes may differ when the decode's is a multiple of the prefill's: each prefill rank's KV
        heads are then split over `fanout(decode)` decode ranks (no replicated heads)."""
        lines = self.diff(decode, mine="prefill", theirs="decode",
                          fields=("model", "dtype", "kv_scales", "num_layers", "head_dim", "page_size"))
        if self.tp_size == decode.tp_size:
            lines += self.diff(decode, mine="prefill", theirs="decode", fields=("kv_heads",))
        elif decode.tp_size % self.tp_size or self.kv_heads != decode.kv_heads * (decode.tp_size // self.tp_size):
            lines.append(f"tp_size: prefill has {self.tp_size} ({self.kv_heads} KV heads per rank), decode has "
                         f"{decode.tp_size} ({decode.kv_heads} KV heads per rank); the decode's tp must be a "
                         "multiple of the prefill's that splits each prefill rank's KV heads")
        return lines

    def fanout(self, decode: KVLayout) -> int:
        """How many decode ranks share one prefill rank's KV heads."""
        return decode.tp_size // self.tp_size


def prefill_dp_rank(room: int, dp_size: int) -> int:
    """The prefill DP group that runs bootstrap room `room` and holds its KV (SGLang's rule)."""
    return room % dp_size


class Registration(msgspec.Struct, frozen=True, kw_only=True):
    """A prefill rank, as decode ranks find it at the bootstrap server: rank `tp_rank` of the
    attention tensor-parallel group of DP group `dp_rank` (of `dp_size`)."""

    tp_rank: int
    dp_rank: int = 0
    dp_size: int = 1
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
    # Decode tp = fanout x prefill tp: this decode rank holds the prefill rank's KV heads
    # [head_start, head_start + layout.kv_heads); `fanout` decode ranks ask this prefill rank.
    head_start: int = 0
    fanout: int = 1


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
