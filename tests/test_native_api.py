"""Ollama's native API and /v1 through the gateway, over plain HTTP: methods, bodies, shapes, policy."""

import hashlib
import json
import threading
import time

import httpx
import psutil
import pytest

from auth.policy import ModelPolicy
from core.settings import MIB
from tests.processes import running_main
from tests.servers import add_user
from tests.streams import chat_body
from tests.surfaces import MODEL_LISTS, error_message, model_calls


@pytest.mark.parametrize("path", ["/", "/api/version", "/api/tags"])
def test_head_routes_answer_200(client, ollama, path):
    response = client.head(path)
    assert response.status_code == 200
    assert response.content == b""


def test_head_and_get_root_need_no_token_and_never_redirect(anonymous):
    for method in ("HEAD", "GET"):
        response = anonymous.request(method, "/", follow_redirects=False)
        assert response.status_code == 200
        assert "location" not in response.headers


def test_head_on_a_blob(client, ollama):
    data = b"layer bytes"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert client.head(f"/api/blobs/{digest}").status_code == 404
    assert client.post(f"/api/blobs/{digest}", content=data).status_code == 201
    assert client.head(f"/api/blobs/{digest}").status_code == 200


@pytest.mark.parametrize(
    "name", ["not-a-digest", "sha256:1234", "sha256:" + "g" * 64, "..%2F..%2Fsecret_key"]
)
def test_a_blob_name_that_is_not_a_digest_is_400(client, ollama, name):
    response = client.post(f"/api/blobs/{name}", content=b"x")
    assert response.status_code == 400
    assert not ollama.requests


def test_delete_with_a_json_body(client, ollama):
    response = client.request("DELETE", "/api/delete", json={"model": "llava:7b"})
    assert response.status_code == 200
    assert "llava:7b" not in {model["name"] for model in client.get("/api/tags").json()["models"]}
    assert json.loads(ollama.requests[-2].body) == {"model": "llava:7b"}


def test_a_known_path_with_the_wrong_method_is_405(client, ollama):
    response = client.get("/api/chat")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert set(response.json()) == {"error"}


def _blob_pieces(total: int, piece: int = 256 * 1024):
    """Pseudo-random content made on the fly, so the test itself never holds the whole blob."""
    seed = hashlib.sha256(b"seed").digest()
    sent = 0
    while sent < total:
        block = hashlib.sha256(seed + sent.to_bytes(8, "big")).digest() * (piece // 32)
        yield block[: total - sent]
        sent += len(block)


def test_a_20_mb_blob_streams_through_with_bounded_gateway_memory(tmp_path, ollama):
    size = 20 * MIB
    digest = hashlib.sha256()
    for piece in _blob_pieces(size):
        digest.update(piece)
    path = f"/api/blobs/sha256:{digest.hexdigest()}"
    password = "blob-test-password"
    with running_main(tmp_path, OLLAMA_URL=ollama.url, ADMIN_PASSWORD=password) as (url, _, pid):
        token = httpx.post(f"{url}/login", json={"email": "admin@local", "password": password}).json()
        process = psutil.Process(pid)
        before = process.memory_info().rss
        peak = before
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, process.memory_info().rss)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            response = httpx.post(
                url + path,
                content=_blob_pieces(size),
                headers={"Authorization": f"Bearer {token['access_token']}"},
                timeout=60,
            )
        finally:
            done.set()
            sampler.join()
    assert response.status_code == 201
    assert ollama.blob_bytes_received == size
    assert peak - before < 8 * MIB, f"the gateway grew by {(peak - before) / MIB:.1f} MB for a 20 MB blob"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat", chat_body(tokens=1000, interval=0.05)),
        ("/api/chat", chat_body(tokens=1000, interval=0.05)),
        ("/v1/chat/completions", chat_body(tokens=1000, interval=0.05) | {"stream": True}),
    ],
)
def test_client_disconnect_closes_upstream_on_every_streaming_surface(client, ollama, path, body):
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines), next(lines)
        # Leaving the block closes the connection: the client went away mid-generation.
    closed_at = time.monotonic()
    record = ollama.wait_for_stream_end(timeout=5)
    assert not record.finished
    assert record.client_gone_at is not None
    assert record.client_gone_at - closed_at < 0.5
    assert record.lines_sent < 100


def test_v1_errors_from_the_gateway_have_openais_shape(gateway, ollama):
    unauthorized = httpx.get(f"{gateway.url}/v1/models")
    assert unauthorized.status_code == 401
    assert unauthorized.json()["error"]["code"] == "invalid_api_key"
    bad_body = httpx.post(f"{gateway.url}/v1/chat/completions", content=b"{", headers=gateway.admin_headers())
    assert bad_body.status_code == 400
    assert set(bad_body.json()["error"]) == {"message", "type", "param", "code"}
    unknown = httpx.get(f"{gateway.url}/v1/no-such-thing", headers=gateway.admin_headers())
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "invalid_request_error"


def test_ollama_routes_keep_ollamas_flat_error_shape(gateway, ollama):
    response = httpx.post(f"{gateway.url}/api/chat", content=b"{", headers=gateway.admin_headers())
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert isinstance(response.json()["error"], str)


def test_a_model_can_be_named_name_as_older_clients_do(client, ollama):
    response = client.post("/api/show", json={"name": "llama3.2:1b"})
    assert response.status_code == 200


class _WithoutLlava(ModelPolicy):
    def allows(self, user, model):
        return not model.startswith("llava")


MODEL_SURFACES = [("POST", path, body) for path, body in model_calls("llava:7b")] + [
    ("GET", "/v1/models/llava:7b", None),
    ("POST", "/api/show", {"name": "llava:7b"}),  # the older way of naming the model
]


@pytest.fixture
def restricted(make_gateway):
    gateway = make_gateway()
    gateway.services.policy = _WithoutLlava()
    return gateway, add_user(gateway, "restricted@example.com")


@pytest.mark.parametrize(
    ("method", "path", "body"), MODEL_SURFACES, ids=[path for _, path, _ in MODEL_SURFACES]
)
def test_every_surface_that_names_a_model_asks_the_policy(restricted, ollama, method, path, body):
    gateway, token = restricted
    response = httpx.request(
        method, gateway.url + path, json=body, headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 403
    assert "llava" in error_message(response)
    assert not ollama.requests, "a refused request must not reach Ollama"


@pytest.mark.parametrize(("path", "field", "key"), MODEL_LISTS)
def test_every_model_list_is_filtered_by_the_policy(restricted, ollama, path, field, key):
    gateway, token = restricted
    listed = httpx.get(gateway.url + path, headers={"Authorization": f"Bearer {token}"}).json()[field]
    names = {entry[key] for entry in listed}
    assert "llama3.2:1b" in names
    assert not any(name.startswith("llava") for name in names)
