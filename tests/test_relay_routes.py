"""The relay endpoints are routes of the app's one router: its 404 and 405, its error handlers, its docs."""

import httpx
import pytest

from core.body_limit import BodyLimitMiddleware
from core.startup_errors import OneLineStartupErrors
from core.storage_errors import Busy
from observe.access_log import AccessLog
from routes.guard import CredentialsFirst
from routes.ollama import RELAY_ROUTES
from routes.relay_endpoints import RelayRoute, RelayRoutes, RelayRoutesFirst

DIGEST = "sha256:" + "0" * 64


def test_relay_routes_are_the_first_entry_of_the_apps_router(gateway):
    first, *others = gateway.app.router.routes
    assert isinstance(first, RelayRoutes)
    assert first.routes == RELAY_ROUTES
    assert not any(isinstance(route, RelayRoute | RelayRoutes) for route in others)
    # No second routing table: the middleware that calls a relay endpoint first asks the router's own entry.
    middleware = {entry.cls: entry for entry in gateway.app.user_middleware}
    assert set(middleware) == {
        AccessLog,
        OneLineStartupErrors,
        CredentialsFirst,
        BodyLimitMiddleware,
        RelayRoutesFirst,
    }
    assert middleware[RelayRoutesFirst].kwargs["routes"] is first


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        pytest.param("HEAD", "/models", "GET", id="head-on-a-get-route"),
        pytest.param("GET", "/api/chat", "POST", id="exact-path"),
        pytest.param("GET", f"/api/blobs/{DIGEST}", "HEAD, POST", id="path-parameter"),
        pytest.param("POST", "/v1/models/hf.co/org/model", "GET", id="model-name-with-slashes"),
        pytest.param("PUT", "/api/tags", "GET, HEAD", id="get-and-head-routes"),
    ],
)
def test_relay_path_with_another_method_is_405_naming_every_method(client, ollama, method, path, allow):
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert not ollama.requests


def test_relay_path_parameter_is_never_empty(client, ollama):
    # Not a model named "": the router's own answer for a path that is only a trailing slash away.
    response = client.get("/v1/models/", follow_redirects=False)
    assert response.status_code == 307
    assert response.headers["location"].endswith("/v1/models")
    assert not ollama.requests


class _LockedPolicy:
    def require(self, user, model):
        raise Busy("database is locked")


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        pytest.param("/api/chat", {"model": "m", "messages": []}, lambda json: json["error"], id="ollama"),
        pytest.param(
            "/v1/chat/completions",
            {"model": "m", "messages": []},
            lambda json: json["error"]["message"],
            id="openai",
        ),
    ],
)
def test_relay_route_error_goes_through_the_apps_handlers(make_gateway, ollama, path, body, message):
    gateway = make_gateway()
    gateway.services.policy = _LockedPolicy()
    response = httpx.post(f"{gateway.url}{path}", json=body, headers=gateway.admin_headers())
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "busy" in message(response.json())
    assert not ollama.requests


def test_relay_routes_are_documented_from_the_routes_themselves(gateway):
    paths = gateway.app.openapi()["paths"]
    for route in RELAY_ROUTES:
        operation = paths[route.path_format][route.method.lower()]
        assert operation["summary"] == route.summary
    assert [parameter["name"] for parameter in paths["/v1/models/{model}"]["get"]["parameters"]] == ["model"]


class _LockedAuthenticator:
    async def identify(self, authorization):
        raise Busy("database is locked")


@pytest.mark.parametrize("path", ["/me", "/api/chat", "/v1/models"])
def test_locked_database_while_checking_credentials_is_503(make_gateway, ollama, path):
    # The credentials guard runs in front of FastAPI's exception middleware; it still answers with the
    # app's handler for a busy database, not a 500.
    gateway = make_gateway()
    headers = gateway.admin_headers()
    gateway.services.authenticator = _LockedAuthenticator()
    response = httpx.post(f"{gateway.url}{path}", json={}, headers=headers)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert not ollama.requests
