"""The public face: /health, the docs, CORS, and errors in one JSON shape."""

import httpx
import pytest

from tests.streams import chat_body


def test_health_is_public_and_reports_ollama(anonymous, ollama):
    response = anonymous.get("/health")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "ollama_url": ollama.url,
        "ollama_reachable": True,
        "ollama_version": ollama.version,
        "hosts": 1,
        "hosts_in_service": 1,
    }


def test_health_reports_ollama_down_without_failing(make_gateway, unused_port):
    gateway = make_gateway(ollama_url=f"http://127.0.0.1:{unused_port}")
    response = httpx.get(f"{gateway.url}/health")
    assert response.status_code == 200
    assert response.json()["status"] == "degraded"
    assert response.json()["ollama_reachable"] is False
    assert httpx.get(f"{gateway.url}/models", headers=gateway.admin_headers()).status_code == 502


def test_health_never_shows_credentials_from_the_ollama_url(make_gateway, ollama):
    gateway = make_gateway(ollama_url=ollama.url.replace("http://", "http://operator:hunter2-secret@"))
    body = httpx.get(f"{gateway.url}/health").text
    assert "hunter2-secret" not in body
    assert ollama.url.removeprefix("http://") in body


def test_models_lists_ollamas_tags(client, ollama):
    response = client.get("/models")
    assert response.status_code == 200
    assert response.json() == {"models": ollama.models}


def test_openapi_describes_every_endpoint_with_the_bearer_scheme(anonymous):
    spec = anonymous.get("/openapi.json").json()
    assert {"/login", "/chat", "/models", "/upload", "/files/{filename}", "/health"} <= set(spec["paths"])
    schemes = spec["components"]["securitySchemes"]
    assert schemes["bearer"]["type"] == "http"
    assert schemes["bearer"]["scheme"] == "bearer"
    assert schemes["login"]["flows"]["password"]["tokenUrl"] == "login"
    for path in ("/chat", "/models", "/upload", "/files/{filename}"):
        for operation in spec["paths"][path].values():
            assert {"bearer": []} in operation["security"], path
    assert "requestBody" in spec["paths"]["/chat"]["post"]


def test_docs_page_is_served(anonymous):
    response = anonymous.get("/docs")
    assert response.status_code == 200
    assert "swagger" in response.text.lower()


def test_unknown_route_is_404_json(client):
    response = client.get("/no/such/thing")
    assert response.status_code == 404
    assert response.json() == {"error": "not found"}


def test_unknown_route_without_a_token_is_401_like_every_route_that_is_not_public(anonymous):
    response = anonymous.get("/no/such/thing")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_wrong_method_is_405_json(client):
    response = client.delete("/models")
    assert response.status_code == 405
    assert set(response.json()) == {"error"}


def test_a_json_body_over_the_request_cap_is_413(make_gateway):
    gateway = make_gateway(max_request_mb=1)
    body = chat_body(text="x" * (2 * 1024 * 1024))
    response = httpx.post(f"{gateway.url}/chat", json=body, headers=gateway.admin_headers())
    assert response.status_code == 413
    assert "too large" in response.json()["error"]


ORIGIN = "http://app.example.com"


@pytest.fixture
def cors_gateway(make_gateway):
    return make_gateway(cors_origins=[ORIGIN])


def test_cors_preflight_needs_no_token(cors_gateway):
    response = httpx.options(
        f"{cors_gateway.url}/chat",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in response.headers["access-control-allow-headers"].lower()


def test_cors_refuses_an_origin_not_listed(cors_gateway):
    response = httpx.options(
        f"{cors_gateway.url}/chat",
        headers={"Origin": "http://evil.example.com", "Access-Control-Request-Method": "POST"},
    )
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


def test_cors_headers_reach_error_responses_so_the_page_can_read_them(cors_gateway):
    response = httpx.get(f"{cors_gateway.url}/models", headers={"Origin": ORIGIN})
    assert response.status_code == 401
    assert response.headers["access-control-allow-origin"] == ORIGIN


def test_without_cors_origins_no_origin_is_allowed(anonymous):
    response = anonymous.get("/health", headers={"Origin": ORIGIN})
    assert "access-control-allow-origin" not in response.headers


def test_cors_origins_are_read_comma_separated_from_the_environment(monkeypatch):
    from core.settings import Settings

    monkeypatch.setenv("CORS_ORIGINS", "http://a.example, http://b.example/")
    assert Settings(_env_file=None).cors_origins == ["http://a.example", "http://b.example"]


def test_env_example_documents_every_setting():
    from pathlib import Path

    from core.settings import Settings

    example = (Path(__file__).resolve().parent.parent / ".env.example").read_text()
    documented = {line.lstrip("# ").split("=", 1)[0] for line in example.splitlines() if "=" in line}
    assert {name.upper() for name in Settings.model_fields} <= documented
