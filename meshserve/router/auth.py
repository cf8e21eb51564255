"""BearerKeyMiddleware: the router's --api-key, checked in one place for every route except
OPEN_PATHS (an allow-list: a new route is guarded by default)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from meshserve.router.upstream import error_response

# Probes and scraping work without the secret.
OPEN_PATHS = frozenset({"/health", "/metrics"})


class BearerKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                response = error_response(401, "Incorrect or missing API key (send 'Authorization: Bearer <key>')",
                                          code="invalid_api_key")
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
