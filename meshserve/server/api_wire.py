"""The OpenAI wire primitives every HTTP front shares: the error body and server-sent events.

Kept apart from `openai_api` (the request schemas, which reach the grammar code and through
xgrammar torch) so that the router, which must import no torch, can answer errors and end
streams exactly as the server does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    from meshserve.server.generation import GenerateError

SSE_DONE = b"data: [DONE]\n\n"



class APIError(Exception):
    """An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    @classmethod
    def from_generate_error(cls, err: GenerateError) -> APIError:
        code = "service_unavailable" if err.status == 503 else None
        return cls(err.status, str(err), param=getattr(err, "param", None), code=code)

    @classmethod
    def not_supported(cls, field: str, what: str = "") -> APIError:
        return cls(400, f"{field}{what} is not supported yet", param=field)

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


_json_encoder = msgspec.json.Encoder()


def sse(body: dict[str, Any] | None) -> bytes:
    """One server-sent event; b"" (nothing to send) for None."""
    return b"" if body is None else b"data: " + _json_encoder.encode(body) + b"\n\n"
