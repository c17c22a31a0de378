"""The access log: one line per HTTP request, written once its answer has ended, and the request id.

A pure ASGI middleware, the app's outermost: it gives each request its `RequestLog` (observe.request_log),
with the client's `X-Request-ID` when it is a sane one (else a new random id), returns that id in the
answer's head, and writes one line to the `gateway.access` logger once the app is done with the request
(its last body message sent, or the app returned or raised): key=value text, or one JSON object
(LOG_FORMAT). It counts the request in `gateway_requests_total` too.

A line holds who asked (user and key ids), what (method, path without its query string, the route), how it
went (status, duration) and, for a model call, its usage record's model, host, waits and tokens. Never a
header's value, a credential, a password or a body.

The relay's streams go through here, and the bench holds them to nginx's pace (README, Performance): the
`send` wrapper is a plain function that, once the head is out, hands each body message straight to the
server's `send` (no coroutine of its own per chunk); everything else happens once per request.
"""

import json
import logging
import re
import secrets
import sys
import time
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.client_address import IPNetwork, client_address
from observe.labels import OTHER
from observe.metrics import count_request
from observe.request_log import SCOPE_KEY, RequestLog

logger = logging.getLogger("gateway.access")

REQUEST_ID_HEADER = b"x-request-id"
# What a request id from a client may be: long enough for a UUID or a trace id, nothing that could end a log
# line or a header, or break a key=value field.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# A text field's value is written bare when it holds only these; else as a JSON string (quoted, escaped).
_BARE = re.compile(r"[A-Za-z0-9._:/@+-]+")
NO_STATUS = 500  # the app raised, or returned, before starting an answer: the server answers 500


def configure_access_logger() -> None:
    """The access lines go to standard output, one per line, as they are. uvicorn configures its own loggers
    only: without a handler here, Python would drop lines below WARNING. Where the logger already has one
    (set up by the operator, or a test), that one is kept."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID if it is a sane one (the first, if it sent several), else a new one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            sent = value.decode("latin-1")
            if SANE_REQUEST_ID.fullmatch(sent):
                return sent
            break
    return secrets.token_hex(16)


class AccessLog:
    def __init__(
        self, app: ASGIApp, log_format: str = "text", trusted_proxies: tuple[IPNetwork, ...] = ()
    ) -> None:
        self.app = app
        self._json = log_format == "json"
        self._trusted_proxies = trusted_proxies
        self._static_paths: frozenset[str] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        entry = RequestLog(request_id_of(scope["headers"]))
        scope[SCOPE_KEY] = entry
        id_header = (REQUEST_ID_HEADER, entry.request_id.encode("ascii"))
        status = 0

        def send_with_id(message: Message) -> Any:
            # Returns `send`'s awaitable rather than awaiting it: one plain call per streamed chunk.
            nonlocal status
            if status or message["type"] != "http.response.start":
                return send(message)
            status = message["status"]
            return send({**message, "headers": [*message.get("headers", ()), id_header]})

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            status = status or NO_STATUS
            surface = self._surface(scope)
            count_request(surface, status)
            logger.info(self._line(scope, entry, status, surface, time.perf_counter() - started))

    def _surface(self, scope: Scope) -> str:
        """The route's path template (`/v1/models/{model}`), a bounded label; `other` for paths no route
        serves. A request refused before routing (401) is named by its path when that is a route's."""
        # A relay endpoint names its route; the router leaves the route it matched in the scope.
        route = getattr(scope.get("endpoint"), "route", None) or scope.get("route")
        template = getattr(route, "path_format", None)
        if isinstance(template, str):
            return template
        if self._static_paths is None:
            self._static_paths = _static_paths(scope["app"].router.routes)
        path: str = scope["path"]
        return path if path in self._static_paths else OTHER

    def _line(self, scope: Scope, entry: RequestLog, status: int, surface: str, duration: float) -> str:
        fields: dict[str, Any] = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "request_id": entry.request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "client": client_address(scope, self._trusted_proxies),
            "user_id": entry.user_id,
            "key_id": entry.key_id,
            "surface": surface,
        }
        usage = entry.usage
        if usage is not None:
            fields.update(
                surface=usage.surface,
                model=usage.model,
                host=usage.host,
                band=usage.band,
                outcome=str(usage.outcome),
                queue_seconds=round(usage.queue_seconds, 6),
                ttfb_seconds=None if usage.ttfb_seconds is None else round(usage.ttfb_seconds, 6),
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                estimated=usage.estimated,
            )
        fields["duration_seconds"] = round(duration, 6)
        if self._json:
            return json.dumps(fields, separators=(",", ":"))
        return " ".join(f"{name}={_text_value(value)}" for name, value in fields.items())


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    # A path is the client's: quoted and escaped unless plain, so that it can't end the line or fake a field.
    return text if _BARE.fullmatch(text) else json.dumps(text)


def _static_paths(routes: list[Any]) -> frozenset[str]:
    paths = set()
    for route in routes:
        for member in getattr(route, "routes", None) or [route]:  # the relay routes are one entry
            template = getattr(member, "path_format", None)
            if isinstance(template, str) and "{" not in template:
                paths.add(template)
    return frozenset(paths)
