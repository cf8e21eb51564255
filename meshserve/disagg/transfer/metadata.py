"""The blob `local_metadata` returns: msgpack of a typed struct (never pickle), so a peer's bytes
can only decode into these plain fields."""

from __future__ import annotations

import msgspec

from meshserve.disagg.transfer.base import TransferError


class PeerMetadata(msgspec.Struct, frozen=True):
    backend: str    # which backend made it: mixing backends across a PD pair is refused
    agent: str      # the peer's agent_name
    device: str     # where its registered memory lives, "cpu" | "cuda" ...
    device_id: int  # ... and which device: the writer must describe remote memory that way
    blob: bytes     # the library's own connection info (NIXL agent metadata, Mooncake session id)


def encode(md: PeerMetadata) -> bytes:
    return msgspec.msgpack.encode(md)


def decode(data: bytes, *, backend: str) -> PeerMetadata:
    try:
        md = msgspec.msgpack.decode(data, type=PeerMetadata)
    except msgspec.DecodeError as e:
        raise TransferError(f"peer metadata is not a {backend} backend's: {e}") from e
    if md.backend != backend:
        raise TransferError(f"peer {md.agent!r} uses the {md.backend} transfer backend, this "
                            f"server uses {backend}: both sides must use the same transfer backend")
    return md
