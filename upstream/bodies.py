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
    except (ValueError, UnicodeDecodeError):
        raise GatewayError(400, "the request body must be JSON") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return body


def check_chat_body(raw: bytes) -> dict[str, Any]:
    body = parse_json_object(raw)
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise GatewayError(400, "'model' is required and must be a model name")
    if not isinstance(body.get("messages"), list):
        raise GatewayError(400, "'messages' is required and must be a list of messages")
    return body
