"""RequestBody: a client's request as the router needs it — raw bytes to forward unchanged, the
JSON (when it is a JSON object) for the routing text, the stream flag and PD's fields."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

from meshserve.router.routing_text import routing_text


@dataclass(frozen=True)
class RequestBody:
    raw: bytes
    # The JSON object, or None when the body is not one: such a body is forwarded as is and
    # the worker answers it (its 400 is the right answer, not the router's).
    json: dict[str, Any] | None

    @classmethod
    def parse(cls, raw: bytes) -> RequestBody:
        try:
            value = msgspec.json.decode(raw) if raw else None
        except msgspec.DecodeError:
            value = None
        return cls(raw, value if isinstance(value, dict) else None)

    @property
    def stream(self) -> bool:
        return self.json is not None and self.json.get("stream") is True

    @property
    def text(self) -> str:
        return routing_text(self.json)
