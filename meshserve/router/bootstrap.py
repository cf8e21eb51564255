"""The PD bootstrap fields a router adds to a request so that the decode server can fetch the
prefill server's KV: bootstrap_host (the prefill's host), bootstrap_port (the prefill's given
port, or null for its default) and bootstrap_room (a random id in [0, 2**63) naming the
transfer). A batch /generate gets one room per prompt, every field as a list."""

from __future__ import annotations

import random
from typing import Any

ROOM_LIMIT = 2**63


def batch_size(body: dict[str, Any]) -> int | None:
    """The number of prompts of a batch /generate (a list of texts or of id lists), or None."""
    text, ids = body.get("text"), body.get("input_ids")
    if isinstance(text, list):
        return len(text)
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return len(ids)
    return None


def with_bootstrap(body: dict[str, Any], host: str, port: int | None, rng: random.Random) -> dict[str, Any]:
    """A copy of `body` with the bootstrap fields (the client's own values are replaced: the
    router chose the pair)."""
    n = batch_size(body)
    if n is None:
        fields: dict[str, Any] = {"bootstrap_host": host, "bootstrap_port": port,
                                  "bootstrap_room": rng.randrange(ROOM_LIMIT)}
    else:
        fields = {"bootstrap_host": [host] * n, "bootstrap_port": [port] * n,
                  "bootstrap_room": [rng.randrange(ROOM_LIMIT) for _ in range(n)]}
    return {**body, **fields}
