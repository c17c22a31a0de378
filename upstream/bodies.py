"""Checks on the JSON bodies the gateway forwards to Ollama.

The body is forwarded exactly as the client sent it (options, tools, images, `stream`...); it is parsed only
to refuse what Ollama could not use, with a clear 400 instead of whatever Ollama would make of it.
"""

import json
from typing import Any

from core.errors import GatewayError


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise GatewayError(400, "the request body must be JSON") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return body


def model_named_in(body: dict[str, Any]) -> str:
    """The model a request is for: `model`, or `name` as older clients (and ollama-js) still send."""
    model = body.get("model") or body.get("name")
    if not isinstance(model, str) or not model.strip():
        raise GatewayError(400, "model is required")
    return model


def check_chat_messages(body: dict[str, Any]) -> None:
    if not isinstance(body.get("messages"), list):
        raise GatewayError(400, "'messages' is required and must be a list of messages")
