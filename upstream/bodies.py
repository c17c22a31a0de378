"""What the gateway reads of the JSON bodies it forwards to Ollama, read as Ollama will read them.

The body is forwarded exactly as the client sent it (options, tools, images, `stream`...). Only the fields the
gateway decides on are read, with Go's rules (`upstream.go_json`): the model, for the policy, and on `/chat`
whether `messages` is a list. Anything the gateway can't read exactly as Ollama would is refused with 400.
"""

import asyncio
from collections.abc import Callable, Collection
from dataclasses import dataclass

from core.errors import GatewayError
from upstream.go_json import PARSE_WHOLE_LIMIT, BodyRefused, GoFields, read_fields


@dataclass(frozen=True)
class BodyRules:
    """What the gateway decides on in one surface's body, named as Ollama's Go struct names it."""

    # The fields that name the model, in the order Ollama's handler prefers them: the first one that is not
    # empty wins (`/api/show` takes `model`, else the deprecated `name`; every other surface only `model`).
    model_fields: tuple[str, ...] = ()
    # Other fields `check` looks at.
    checked_fields: tuple[str, ...] = ()
    check: Callable[[GoFields], None] | None = None

    @property
    def fields(self) -> tuple[str, ...]:
        return self.model_fields + self.checked_fields


async def read_body_fields(raw: bytes, names: Collection[str]) -> GoFields:
    try:
        # Parsed whole on the event loop (microseconds); larger bodies, base64 images mostly, are walked in a
        # worker thread, so that one of millions of tiny values never holds up every other stream.
        if len(raw) <= PARSE_WHOLE_LIMIT:
            return read_fields(raw, names)
        return await asyncio.to_thread(read_fields, raw, names)
    except BodyRefused as refused:
        raise GatewayError(400, str(refused)) from None


def model_named_in(fields: GoFields, model_fields: tuple[str, ...]) -> str:
    """The model Ollama's handler will use: the first of its model fields that is not empty."""
    try:
        model = next((value for name in model_fields if (value := fields.string(name))), "")
    except BodyRefused as refused:
        raise GatewayError(400, str(refused)) from None
    if not model.strip():
        raise GatewayError(400, "model is required")
    return model


def check_chat_messages(fields: GoFields) -> None:
    if not fields.is_array("messages"):
        raise GatewayError(400, "'messages' is required and must be a list of messages")


def refuse_content_encoding(content_encoding: str | None) -> None:
    """A compressed body is refused: the gateway must read what Ollama reads, and Ollama decompresses some
    bodies itself (zstd on `/v1`), which the gateway would otherwise forward unread."""
    if content_encoding and content_encoding.strip().lower() != "identity":
        raise GatewayError(
            415, f"compressed request bodies are not accepted (Content-Encoding: {content_encoding})"
        )


USAGE_ASKED = b'"stream_options":{"include_usage":true}'


def with_usage_asked(raw: bytes) -> bytes:
    """An OpenAI-style streaming body that also asks Ollama for the usage event (the gateway's, for the
    record; `upstream.passthrough` keeps it from a client that did not ask). Added as the object's last
    member: Go binds members in order, so it wins, and it is bound into a `stream_options` the client gave,
    leaving the client's other options as they were. The body was read as one JSON object with only
    whitespace after it (`upstream.go_json`)."""
    body = raw.rstrip()
    inner = body[:-1].rstrip()
    return inner + (USAGE_ASKED if inner.endswith(b"{") else b"," + USAGE_ASKED) + b"}"
