"""--api-key guards every route of the app but the listed probes (in-process, no model): the
routes are enumerated from the app itself, so a route added later, or one the middleware lets
through by mistake (a prefix check, an extra open path), fails here."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.app_routes import EXPECTED_OPEN_PATHS, app_routes, build_app, guarded_routes

KEY = "s3cret"


@pytest.fixture(scope="module")
def client():
    with TestClient(build_app(KEY), raise_server_exceptions=False) as client:
        yield client


def test_the_app_has_the_routes_we_expect_to_guard():
    paths = {p for _, p in app_routes()}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/generate", "/flush_cache"} <= paths
    assert EXPECTED_OPEN_PATHS <= paths


@pytest.mark.parametrize("method,path", guarded_routes())
@pytest.mark.parametrize("auth", [None, "Bearer nope", f"Bearer {KEY}x", KEY], ids=["none", "wrong", "longer", "no-bearer"])
def test_every_route_refuses_a_missing_or_wrong_key(client, method, path, auth):
    headers = {"Authorization": auth} if auth else {}
    response = client.request(method, path, headers=headers, json={})
    assert response.status_code == 401, (method, path, response.status_code)
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert response.headers["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("method,path", guarded_routes())
def test_the_right_key_passes_the_middleware(client, method, path):
    # The stub context cannot serve, so the handler answers anything but 401 (400, 500, 503...).
    response = client.request(method, path, headers={"Authorization": f"Bearer {KEY}"}, json={})
    assert response.status_code != 401, (method, path)


@pytest.mark.parametrize("path", sorted(EXPECTED_OPEN_PATHS))
def test_probes_answer_without_the_key(client, path):
    assert client.get(path).status_code != 401


def test_unknown_paths_are_guarded_too(client):
    assert client.get("/no/such/route").status_code == 401
