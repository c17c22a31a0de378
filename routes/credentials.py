"""Reading an email and password from a login request: JSON, or the OAuth2 password form `/docs` sends."""

import json
from dataclasses import dataclass
from typing import Any, TypeGuard

from fastapi import Request

from core.errors import GatewayError
from core.text import is_valid_text

MAX_FIELD_LENGTH = 1024
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


@dataclass(frozen=True)
class Credentials:
    email: str
    password: str


async def read_credentials(request: Request) -> Credentials:
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith(FORM_TYPES):
        async with request.form(max_files=0, max_fields=10) as form:
            email, password = form.get("username") or form.get("email"), form.get("password")
    else:
        body = parse_json_object(await request.body())
        email, password = body.get("email"), body.get("password")
    if not _is_field(email) or not _is_field(password):
        raise GatewayError(422, "send 'email' and 'password' as non-empty strings")
    return Credentials(email=email.strip(), password=password)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise GatewayError(400, "the request body must be JSON") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    return body


def _is_field(value: object) -> TypeGuard[str]:
    return isinstance(value, str) and 0 < len(value) <= MAX_FIELD_LENGTH and is_valid_text(value)
