"""The HTTP application's routes, read from the FastAPI app that `create_app` builds (not from a
list kept by hand), so api-key tests cover a route the moment it is added."""

from __future__ import annotations

import re
from types import SimpleNamespace

from fastapi.routing import APIRoute

from meshserve.config.server_args import HttpArgs, ServerArgs
from meshserve.server.http_server import OPEN_PATHS, AppContext, create_app

# Answered without the key on purpose (probes and scraping): must stay exactly the server's list.
EXPECTED_OPEN_PATHS = frozenset({"/health", "/health_generate", "/metrics"})


def build_app(api_key: str | None):
    """The real app over a stub context: nothing behind it, enough to route and to run the
    middleware (guarded requests never reach a handler)."""
    tm = SimpleNamespace(not_ready_reason="stub", ready=False, num_in_flight=0, last_output_at=0.0)
    # Real ServerArgs (not a stub) so a new flag the app reads cannot break these tests.
    ctx = AppContext(tm=tm, args=ServerArgs(http=HttpArgs(api_key=api_key)),  # type: ignore[arg-type]
                     model_config=SimpleNamespace(served_model_name="stub", model_path="stub",  # type: ignore[arg-type]
                                                  architecture="LlamaForCausalLM"),
                     metrics=SimpleNamespace(render=lambda: b""))  # type: ignore[arg-type]
    return create_app(ctx)


def app_routes() -> list[tuple[str, str]]:
    """(method, path) of every route the server answers, path parameters filled with "x"."""
    routes = []
    for route in build_app(None).routes:
        if isinstance(route, APIRoute):
            path = re.sub(r"\{[^}]+\}", "x", route.path)
            routes += [(method, path) for method in sorted(route.methods)]
    assert routes and OPEN_PATHS == EXPECTED_OPEN_PATHS, sorted(OPEN_PATHS)
    return routes


def guarded_routes() -> list[tuple[str, str]]:
    return [(m, p) for m, p in app_routes() if p not in EXPECTED_OPEN_PATHS]
