"""Every endpoint that relays to Ollama (routes of the app's router, made in `routes.relay_endpoints`).

Ollama's native API at the same paths Ollama uses, its OpenAI-compatible API under `/v1`, and the two
SPA-friendly aliases `/chat` and `/models`. Model management is for admins; every route that names a model,
and every model list, goes through the model policy.
"""

import re

from core.errors import GatewayError
from routes.relay_docs import MODEL_BODY
from routes.relay_endpoints import OLLAMA_MODEL_LIST, OPENAI_MODEL_LIST, Access, Body, RelayRoute
from routes.schemas import ChatRequest
from upstream.bodies import BodyRules, check_chat_messages

NDJSON_STREAM = {
    "description": "NDJSON stream, one JSON object per line, the last with done:true (one JSON object when "
    'stream is false). If Ollama fails mid-stream, the last line is {"error": "..."}.',
    "content": {"application/x-ndjson": {}, "application/json": {}},
}
PROGRESS_STREAM = {
    "description": 'NDJSON progress lines ending with {"status":"success"} (one object when stream is false)',
    "content": {"application/x-ndjson": {}, "application/json": {}},
}
SSE_STREAM = {
    "description": "OpenAI-style JSON, or with stream: true server-sent events ending with data: [DONE]",
    "content": {"application/json": {}, "text/event-stream": {}},
}
_BLOB_DIGEST = re.compile(r"sha256[:-][0-9a-f]{64}")
_BLOB_PARAM = {"type": "string", "pattern": f"^{_BLOB_DIGEST.pattern}$"}
_NAME = {"type": "string", "minLength": 1}
_COPY_BODY = {
    "type": "object",
    "description": "Ollama's own body, forwarded unchanged",
    "required": ["source", "destination"],
    "properties": {"source": _NAME, "destination": _NAME},
}


def _check_digest(digest: str) -> None:
    if not _BLOB_DIGEST.fullmatch(digest):
        raise GatewayError(400, "a blob is named sha256:<64 hex digits>")


def _check_model_param(model: str) -> None:
    # `/v1/models/../../api/ps` is a different path once a proxy in front of Ollama resolves its dot segments.
    if any(segment in (".", "..") for segment in model.split("/")):
        raise GatewayError(400, "a model name has no '.' or '..' segments")


# How Ollama's handlers name the model (server/routes.go): ShowHandler takes `model`, else the deprecated
# `name`; every other model call, the OpenAI-compatible ones included, only `model`.
MODEL_ONLY = BodyRules(model_fields=("model",))
MODEL_OR_NAME = BodyRules(model_fields=("model", "name"))
CHAT = BodyRules(model_fields=("model",), checked_fields=("messages",), check=check_chat_messages)
# An OpenAI-style call that may stream: whether it streams, and asked for its usage (routes.relay_endpoints).
OPENAI_STREAMING = BodyRules(model_fields=("model",), checked_fields=("stream", "stream_options"))


def _model_call(
    path: str,
    summary: str,
    response_doc: dict | None = None,
    tags: tuple[str, ...] = ("ollama",),
    rules: BodyRules = MODEL_ONLY,
    runs_model: bool = True,
    asks_usage: bool = False,
    embeds: bool = False,
) -> RelayRoute:
    return RelayRoute(
        "POST",
        path,
        summary,
        body=Body.JSON,
        body_rules=rules,
        response_doc=response_doc or {},
        tags=tags,
        runs_model=runs_model,
        asks_usage=asks_usage,
        embeds=embeds,
    )


def _admin_call(
    method: str,
    path: str,
    summary: str,
    response_doc: dict | None = None,
    body_schema: dict | None = MODEL_BODY,
) -> RelayRoute:
    return RelayRoute(
        method,
        path,
        summary,
        access=Access.ADMIN,
        body=Body.JSON,
        body_schema=body_schema,
        response_doc=response_doc or {},
        tags=("ollama: model management",),
    )


RELAY_ROUTES = [
    # The SPA-friendly aliases kept from the original backend.
    RelayRoute(
        "POST",
        "/chat",
        "Chat with a model (Ollama's /api/chat body, streamed back as NDJSON)",
        upstream_path="/api/chat",
        body=Body.JSON,
        body_rules=CHAT,
        runs_model=True,
        request_model=ChatRequest,
        response_doc=NDJSON_STREAM,
        tags=("chat",),
    ),
    RelayRoute(
        "GET",
        "/models",
        "The models you may use (Ollama's /api/tags list)",
        upstream_path="/api/tags",
        model_list=OLLAMA_MODEL_LIST,
        tags=("chat",),
    ),
    # Ollama's native API.
    RelayRoute("GET", "/api/tags", "The models you may use", model_list=OLLAMA_MODEL_LIST, tags=("ollama",)),
    RelayRoute("HEAD", "/api/tags", "The model list (headers only)", tags=("ollama",)),
    RelayRoute(
        "GET", "/api/ps", "Running models you may use", model_list=OLLAMA_MODEL_LIST, tags=("ollama",)
    ),
    _model_call("/api/chat", "Chat (NDJSON stream)", NDJSON_STREAM),
    _model_call("/api/generate", "Generate a completion (NDJSON stream)", NDJSON_STREAM),
    _model_call("/api/embed", "Embeddings for one or more inputs", embeds=True),
    _model_call("/api/embeddings", "Embedding for one prompt (legacy)", embeds=True),
    _model_call("/api/show", "A model's details", rules=MODEL_OR_NAME, runs_model=False),
    _admin_call("POST", "/api/pull", "Pull a model (admins)", PROGRESS_STREAM),
    _admin_call("POST", "/api/push", "Push a model (admins)", PROGRESS_STREAM),
    _admin_call("POST", "/api/create", "Create a model (admins)", PROGRESS_STREAM),
    _admin_call("POST", "/api/copy", "Copy a model (admins)", body_schema=_COPY_BODY),
    _admin_call("DELETE", "/api/delete", "Delete a model; JSON body {model} (admins)"),
    RelayRoute(
        "HEAD",
        "/api/blobs/{digest}",
        "Whether Ollama has a blob (admins)",
        check_param=_check_digest,
        param_schema=_BLOB_PARAM,
        access=Access.ADMIN,
        tags=("ollama: model management",),
    ),
    RelayRoute(
        "POST",
        "/api/blobs/{digest}",
        "Upload a blob, streamed through at any size (admins)",
        check_param=_check_digest,
        param_schema=_BLOB_PARAM,
        access=Access.ADMIN,
        body=Body.STREAM,
        tags=("ollama: model management",),
    ),
    # The OpenAI-compatible API.
    _model_call(
        "/v1/chat/completions",
        "Chat completions (SSE when stream is true)",
        SSE_STREAM,
        ("openai",),
        rules=OPENAI_STREAMING,
        asks_usage=True,
    ),
    _model_call(
        "/v1/completions",
        "Completions (SSE when stream is true)",
        SSE_STREAM,
        ("openai",),
        rules=OPENAI_STREAMING,
        asks_usage=True,
    ),
    _model_call("/v1/embeddings", "Embeddings", tags=("openai",), embeds=True),
    _model_call("/v1/responses", "Responses API (SSE when stream is true)", SSE_STREAM, ("openai",)),
    RelayRoute("GET", "/v1/models", "The models you may use", model_list=OPENAI_MODEL_LIST, tags=("openai",)),
    RelayRoute(
        "GET",
        "/v1/models/{model}",
        "One model",
        param_names_model=True,
        check_param=_check_model_param,
        tags=("openai",),
    ),
]
