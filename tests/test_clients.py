"""Drop-in: Ollama's and OpenAI's own client libraries work by pointing them at the gateway with a token."""

from collections.abc import Iterator
from contextlib import contextmanager

import ollama as ollama_sdk
import openai
import pytest

from tests.servers import add_user

MODEL = "llama3.2:1b"
OPTIONS = {"fake_tokens": 4, "fake_interval": 0}


@contextmanager
def ollama_client(url: str, **options) -> Iterator[ollama_sdk.Client]:
    client = ollama_sdk.Client(host=url, **options)
    try:
        yield client
    finally:
        client._client.close()  # the library leaves its httpx client open


@pytest.fixture
def admin_client(gateway):
    token = gateway.login(gateway.admin_email, gateway.admin_password)
    with ollama_client(gateway.url, headers={"Authorization": f"Bearer {token}"}) as client:
        yield client


@pytest.fixture
def user_token(gateway):
    return add_user(gateway, f"user-{id(gateway)}-{len(gateway._tokens)}@example.com")


@pytest.fixture
def user_client(gateway, user_token):
    with ollama_client(gateway.url, headers={"Authorization": f"Bearer {user_token}"}) as client:
        yield client


@pytest.fixture
def openai_client(gateway, user_token):
    with openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=user_token, max_retries=0) as client:
        yield client


def test_ollama_list_shows_the_models(user_client, ollama):
    assert [model.model for model in user_client.list().models] == [entry["model"] for entry in ollama.models]


def test_ollama_show_and_ps(user_client, ollama):
    assert user_client.show(MODEL).details.family == "llama"
    assert {model.model for model in user_client.ps().models} <= {entry["model"] for entry in ollama.models}


def test_ollama_chat_without_streaming(user_client, ollama):
    answer = user_client.chat(model=MODEL, messages=[{"role": "user", "content": "Hi"}], options=OPTIONS)
    assert answer.message.content == "Hello, world!"
    assert answer.done is True


def test_ollama_chat_streaming(user_client, ollama):
    chunks = list(
        user_client.chat(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True, options=OPTIONS
        )
    )
    assert "".join(chunk.message.content for chunk in chunks) == "Hello, world!"
    assert chunks[-1].done is True
    assert len(chunks) == 5


def test_ollama_generate_with_and_without_streaming(user_client, ollama):
    assert user_client.generate(model=MODEL, prompt="Hi", options=OPTIONS).response == "Hello, world!"
    pieces = [
        chunk.response
        for chunk in user_client.generate(model=MODEL, prompt="Hi", stream=True, options=OPTIONS)
    ]
    assert "".join(pieces) == "Hello, world!"


def test_ollama_embed(user_client, ollama):
    result = user_client.embed(model=MODEL, input=["first", "second"])
    assert len(result.embeddings) == 2
    assert all(len(vector) > 0 for vector in result.embeddings)


def test_ollama_pull_with_progress_then_delete_as_admin(admin_client, ollama):
    statuses = [progress.status for progress in admin_client.pull("tinyllama:latest", stream=True)]
    assert statuses[0] == "pulling manifest"
    assert statuses[-1] == "success"
    assert any(progress for progress in statuses if progress.startswith("pulling "))
    assert "tinyllama:latest" in {model.model for model in admin_client.list().models}

    assert admin_client.delete("tinyllama:latest").status == "success"
    assert "tinyllama:latest" not in {model.model for model in admin_client.list().models}


def test_ollama_without_a_token_raises_401(gateway, ollama):
    with ollama_client(gateway.url) as client, pytest.raises(ollama_sdk.ResponseError) as raised:
        client.list()
    assert raised.value.status_code == 401


def test_ollama_with_basic_auth_carrying_the_token(gateway, user_token, ollama):
    with ollama_client(gateway.url, auth=("anyone", user_token)) as client:
        assert client.list().models


@pytest.mark.parametrize("operation", ["pull", "delete", "copy", "create", "push"])
def test_a_user_cannot_manage_models(user_client, ollama, operation):
    calls = {
        "pull": lambda: user_client.pull(MODEL),
        "delete": lambda: user_client.delete(MODEL),
        "copy": lambda: user_client.copy(MODEL, "mine:latest"),
        "create": lambda: user_client.create(model="mine:latest", from_=MODEL),
        "push": lambda: user_client.push(MODEL),
    }
    with pytest.raises(ollama_sdk.ResponseError) as raised:
        calls[operation]()
    assert raised.value.status_code == 403
    assert "admins" in raised.value.error
    assert not [request for request in ollama.requests if request.path.startswith("/api/")]


def test_ollama_unknown_model_raises_404_with_ollamas_message(user_client, ollama):
    with pytest.raises(ollama_sdk.ResponseError) as raised:
        user_client.chat(model="llama9:70b", messages=[{"role": "user", "content": "Hi"}])
    assert raised.value.status_code == 404
    assert raised.value.error == "model 'llama9:70b' not found"


def test_openai_models_list(openai_client, ollama):
    assert {model.id for model in openai_client.models.list()} == {entry["name"] for entry in ollama.models}


def test_openai_chat_completion(openai_client, ollama):
    completion = openai_client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], extra_body={"options": OPTIONS}
    )
    assert completion.choices[0].message.content == "Hello, world!"


def test_openai_chat_completion_streaming(openai_client, ollama):
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        extra_body={"options": OPTIONS},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Hello, world!"


def test_openai_with_a_bad_key_raises_authentication_error(gateway, ollama):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="not-a-token", max_retries=0)
    with client, pytest.raises(openai.AuthenticationError) as raised:
        client.models.list()
    body = raised.value.body
    assert isinstance(body, dict)
    assert body["type"] == "invalid_request_error"
    assert body["code"] == "invalid_api_key"


def test_openai_unknown_model_raises_not_found(openai_client, ollama):
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(
            model="llama9:70b", messages=[{"role": "user", "content": "Hi"}]
        )
