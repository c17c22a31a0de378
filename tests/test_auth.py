"""Login, and who gets in: every wrong token is a 401, and only public routes work without one."""

import statistics
import time

import httpx
import pytest

from tests import tokens
from tests.servers import RunningGateway

pytestmark = pytest.mark.storage

PUBLIC_ROUTES = {
    ("GET", "/"),
    ("HEAD", "/"),
    ("GET", "/favicon.ico"),
    ("GET", "/health"),
    ("POST", "/login"),
    ("GET", "/api/version"),
    ("HEAD", "/api/version"),
}


def secret_key_of(gateway: RunningGateway) -> str:
    return (gateway.settings.data_dir / "secret_key").read_text()


def test_login_with_json_returns_a_bearer_token(gateway, anonymous):
    response = anonymous.post(
        "/login", json={"email": gateway.admin_email, "password": gateway.admin_password}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 1440 * 60
    models = anonymous.get("/models", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert models.status_code == 200


def test_login_accepts_the_oauth2_password_form_of_the_docs_page(gateway, anonymous):
    response = anonymous.post(
        "/login", data={"username": gateway.admin_email, "password": gateway.admin_password}
    )
    assert response.status_code == 200
    assert response.json()["access_token"]


def test_login_email_is_case_insensitive(gateway, anonymous):
    response = anonymous.post(
        "/login", json={"email": gateway.admin_email.upper(), "password": gateway.admin_password}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param({"email": "admin@example.com", "password": "wrong-password"}, id="wrong-password"),
        pytest.param({"email": "nobody@example.com", "password": "whatever-password"}, id="unknown-email"),
    ],
)
def test_login_with_bad_credentials_is_401_json(anonymous, credentials):
    response = anonymous.post("/login", json=credentials)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json() == {"error": "wrong email or password"}


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b'["admin@example.com", "x"]', id="not-an-object"),
        pytest.param(b'{"email": "admin@example.com"}', id="no-password"),
        pytest.param(b'{"email": 5, "password": "x"}', id="email-not-a-string"),
        pytest.param(b"", id="empty"),
    ],
)
def test_login_with_a_malformed_body_is_4xx_json(anonymous, body):
    response = anonymous.post("/login", content=body, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500
    assert "error" in response.json()


def test_login_takes_as_long_for_an_unknown_email_as_for_a_wrong_password(gateway, anonymous):
    def median_seconds(email: str) -> float:
        durations = []
        for _ in range(5):
            start = time.perf_counter()
            response = anonymous.post("/login", json={"email": email, "password": "not-the-password"})
            durations.append(time.perf_counter() - start)
            assert response.status_code == 401
        return statistics.median(durations)

    known, unknown = median_seconds(gateway.admin_email), median_seconds("nobody@example.com")
    # Without the dummy hash the unknown email answers in about a millisecond: a hundredfold difference.
    assert 0.6 < unknown / known < 1.6, (known, unknown)


def admin_claims(gateway: RunningGateway, **changes) -> dict:
    """Claims as the gateway issues them for its admin: its subject is the identity, never a row id."""
    stored = gateway.services.users.find_by_email(gateway.admin_email)
    return tokens.claims(**changes) | {"sub": stored.identity}


def _attack_headers(gateway: RunningGateway) -> dict[str, dict[str, str]]:
    key = secret_key_of(gateway)
    valid = tokens.signed(admin_claims(gateway), key)
    admin_token = gateway.login(gateway.admin_email, gateway.admin_password)
    tampered = tokens.with_payload_swapped(admin_token, admin_claims(gateway, lifetime=10**6))
    return {
        "missing": {},
        "scheme-only": {"Authorization": "Bearer"},
        "malformed": {"Authorization": "Bearer not-a-jwt"},
        "three-garbage-parts": {"Authorization": "Bearer aaa.bbb.ccc"},
        "wrong-scheme-basic": {"Authorization": f"Basic {valid}"},
        "wrong-scheme-token": {"Authorization": f"Token {valid}"},
        "no-scheme": {"Authorization": valid},
        "alg-none": {"Authorization": f"Bearer {tokens.unsigned(admin_claims(gateway))}"},
        "expired": {"Authorization": f"Bearer {tokens.signed(admin_claims(gateway, lifetime=-60), key)}"},
        "other-key": {"Authorization": f"Bearer {tokens.signed(admin_claims(gateway), 'k' * 48)}"},
        "other-algorithm": {"Authorization": f"Bearer {tokens.signed(admin_claims(gateway), key, 'HS512')}"},
        "tampered": {"Authorization": f"Bearer {tampered}"},
        "no-exp": {"Authorization": f"Bearer {tokens.signed(_no_exp(admin_claims(gateway)), key)}"},
        "unknown-user": {
            "Authorization": f"Bearer {tokens.signed(tokens.claims() | {'sub': 'f' * 32}, key)}"
        },
        # Before issue 9 the subject was the row id, which SQLite gave to the next account after a removal.
        "row-id-subject": {"Authorization": f"Bearer {tokens.signed(tokens.claims(1), key)}"},
        "numeric-subject": {
            "Authorization": f"Bearer {tokens.signed(admin_claims(gateway) | {'sub': 1}, key)}"
        },
        "no-version": {
            "Authorization": f"Bearer {tokens.signed(admin_claims(gateway) | {'ver': None}, key)}"
        },
        "old-version": {"Authorization": f"Bearer {tokens.signed(admin_claims(gateway, version=-1), key)}"},
        "fake-api-key": {"Authorization": "Bearer ogw_notreal_" + "x" * 43},
        "cookie-instead-of-header": {"Cookie": f"access_token={admin_token}"},
    }


def _no_exp(claims: dict) -> dict:
    return {name: value for name, value in claims.items() if name != "exp"}


ATTACKS = [
    "missing",
    "scheme-only",
    "malformed",
    "three-garbage-parts",
    "wrong-scheme-basic",
    "wrong-scheme-token",
    "no-scheme",
    "alg-none",
    "expired",
    "other-key",
    "other-algorithm",
    "tampered",
    "no-exp",
    "unknown-user",
    "row-id-subject",
    "numeric-subject",
    "no-version",
    "old-version",
    "fake-api-key",
    "cookie-instead-of-header",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_jwt_attack_is_refused_with_401(gateway, attack):
    headers = _attack_headers(gateway)[attack]
    response = httpx.get(f"{gateway.url}/models", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert set(response.json()) == {"error"}


def test_a_correctly_signed_token_is_accepted(gateway):
    """The control for the attack matrix: the same construction, done right, gets in."""
    token = tokens.signed(admin_claims(gateway), secret_key_of(gateway))
    response = httpx.get(f"{gateway.url}/models", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


def test_every_route_but_the_public_ones_needs_a_token(gateway):
    """Walks the OpenAPI document, so a route added later is checked too."""
    checked = 0
    for path, operations in gateway.app.openapi()["paths"].items():
        for method in operations:
            if (method.upper(), path) in PUBLIC_ROUTES:
                continue
            url = gateway.url + path.replace("{filename}", "0" * 32 + "_x.txt")
            response = httpx.request(method.upper(), url)
            assert response.status_code == 401, (
                f"{method} {path} answered {response.status_code} without a token"
            )
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("path", ["/health", "/docs", "/openapi.json", "/api/version"])
def test_public_routes_answer_without_a_token(anonymous, path):
    assert anonymous.get(path).status_code == 200


def test_ollamas_version_is_served_to_anyone_as_ollama_serves_it(anonymous, ollama):
    """Clients test a connection with it (Open WebUI's "verify connection" failed with a 401 here)."""
    response = anonymous.get("/api/version")
    assert response.json() == {"version": ollama.version}
    assert anonymous.head("/api/version").status_code == 200
    # Only the version: the routes beside it still need a token.
    assert anonymous.get("/api/tags").status_code == 401
    assert anonymous.post("/api/version").status_code == 405


def test_nothing_of_a_request_to_the_public_version_reaches_ollama(anonymous, ollama):
    """Anyone may ask: the gateway asks Ollama itself, with none of the stranger's headers or query."""
    response = anonymous.get(
        "/api/version?x=1",
        headers={"Authorization": "Bearer not-checked-here", "X-Api-Key": "k", "X-Forwarded-For": "6.6.6.6"},
    )
    assert response.status_code == 200
    asked = ollama.requests[-1]
    assert (asked.path, asked.query) == ("/api/version", "")
    assert not {"authorization", "x-api-key", "x-forwarded-for"} & set(asked.headers)
