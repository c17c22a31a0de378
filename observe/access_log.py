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

import asyncio
import itertools
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Awaitable
from datetime import UTC, datetime
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.client_address import IPNetwork, client_address, peer_of
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
BATCH_SECONDS = 0.05
MAX_PEERS_KEPT = 4096


class BatchedLines(logging.StreamHandler):
    """Writes the lines of one moment together: on the event loop, the lines emitted within
    `BATCH_SECONDS` go out in one write (one system call, not one per request: measured, a write per line
    cost a short request more than the rest of its line); anywhere else, at once. What is pending is written
    at exit too (logging's shutdown flushes every handler)."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add_line(line)

    def add_line(self, line: str) -> None:
        self._pending.append(line + self.terminator)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if not self._scheduled:
            self._scheduled = True
            loop.call_later(BATCH_SECONDS, self._flush_batch)

    def _flush_batch(self) -> None:
        self.acquire()
        try:
            self._scheduled = False
            self.flush()
        finally:
            self.release()

    def flush(self) -> None:
        if self._pending:
            lines, self._pending = "".join(self._pending), []
            self.stream.write(lines)
        super().flush()


def configure_access_logger() -> None:
    """The access lines go to standard output, one per line, as they are. uvicorn configures its own loggers
    only: without a handler here, Python would drop lines below WARNING. Where the logger already has one
    (set up by the operator, or a test), that one is kept."""
    if not logger.handlers:
        handler = BatchedLines(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


class _RequestIds:
    """New request ids: this process's random prefix and a counter, 32 hex digits. As unique as random ids
    across processes and restarts, without asking the system for randomness on every request."""

    def __init__(self) -> None:
        self._pid = -1
        self._prefix = ""
        self._count = itertools.count()

    def new(self) -> str:
        if os.getpid() != self._pid:  # a forked worker makes its own
            self._pid, self._prefix, self._count = os.getpid(), secrets.token_hex(8), itertools.count()
        return f"{self._prefix}{next(self._count):016x}"


_new_id = _RequestIds().new


def request_id_of(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's X-Request-ID if it is a sane one (the first, if it sent several), else a new one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            sent = value.decode("latin-1")
            if SANE_REQUEST_ID.fullmatch(sent):
                return sent
            break
    return _new_id()


class AccessLog:
    def __init__(
        self, app: ASGIApp, log_format: str = "text", trusted_proxies: tuple[IPNetwork, ...] = ()
    ) -> None:
        self.app = app
        self._line = self._json_line if log_format == "json" else self._text_line
        self._trusted_proxies = trusted_proxies
        self._static_paths: frozenset[str] | None = None
        self._peers: dict[str | None, str] = {}  # a peer's address as shown (no proxy to ask), found once

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        entry = RequestLog(request_id_of(scope["headers"]))
        scope[SCOPE_KEY] = entry
        answer = _IdentifiedAnswer(send, entry.request_id)
        try:
            await self.app(scope, receive, answer)
        finally:
            status = answer.status or NO_STATUS
            surface = self._surface(scope)
            count_request(surface, status)
            _write(self._line(scope, entry, status, surface, time.perf_counter() - started))

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

    def _json_line(self, scope: Scope, entry: RequestLog, status: int, surface: str, duration: float) -> str:
        fields: dict[str, Any] = {
            "time": _now(),
            "request_id": entry.request_id,
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "client": self._client(scope),
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
                outcome=usage.outcome.value,
                queue_seconds=round(usage.queue_seconds, 6),
                ttfb_seconds=None if usage.ttfb_seconds is None else round(usage.ttfb_seconds, 6),
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                estimated=usage.estimated,
            )
        fields["duration_seconds"] = round(duration, 6)
        return json.dumps(fields, separators=(",", ":"))

    def _text_line(self, scope: Scope, entry: RequestLog, status: int, surface: str, duration: float) -> str:
        """The same fields as `_json_line`, in the same order, as key=value text: written out field by field
        rather than through a dict (a short request's line cost 9 µs that way, half of it here)."""
        q = _text_value
        head = (
            f"time={_now()} request_id={q(entry.request_id)} method={q(scope['method'])} "
            f"path={q(scope['path'])} status={status} client={q(self._client(scope))} "
            f"user_id={q(entry.user_id)} key_id={q(entry.key_id)}"
        )
        usage = entry.usage
        if usage is None:
            return f"{head} surface={q(surface)} duration_seconds={round(duration, 6)}"
        ttfb = usage.ttfb_seconds
        return (
            f"{head} surface={q(usage.surface)} model={q(usage.model)} host={q(usage.host)} "
            f"band={q(usage.band)} outcome={q(usage.outcome.value)} "
            f"queue_seconds={round(usage.queue_seconds, 6)} "
            f"ttfb_seconds={q(None if ttfb is None else round(ttfb, 6))} "
            f"prompt_tokens={q(usage.prompt_tokens)} completion_tokens={q(usage.completion_tokens)} "
            f"estimated={q(usage.estimated)} duration_seconds={round(duration, 6)}"
        )

    def _client(self, scope: Scope) -> str:
        if self._trusted_proxies:
            return client_address(scope, self._trusted_proxies)  # it depends on the headers too
        peer = peer_of(scope)
        shown = self._peers.get(peer)
        if shown is None:
            if len(self._peers) >= MAX_PEERS_KEPT:
                self._peers.clear()
            shown = self._peers[peer] = client_address(scope, ())
        return shown


class _IdentifiedAnswer:
    """The app's `send`: adds the request id to the answer's head and notes its status; hands every body
    message straight to the server's `send`. A slotted object rather than a closure: a stream held open for
    minutes keeps a few dozen bytes of this, not a function, its cells and the header made ready."""

    __slots__ = ("_request_id", "_send", "status")

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self._request_id = request_id
        self.status = 0

    def __call__(self, message: Message) -> Awaitable[None]:
        # Returns `send`'s awaitable rather than awaiting it: one plain call per streamed chunk.
        if self.status or message["type"] != "http.response.start":
            return self._send(message)
        self.status = message["status"]
        id_header = (REQUEST_ID_HEADER, self._request_id.encode("ascii"))
        return self._send({**message, "headers": [*message.get("headers", ()), id_header]})


class _Clock:
    """The time of a line, to the millisecond, in UTC: the date and time of day made once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def now(self) -> str:
        moment = time.time()
        second = int(moment)
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._prefix}.{int((moment - second) * 1000):03d}+00:00"


_now = _Clock().now


def _write(line: str) -> None:
    """One access line out. Through the logging machinery when someone set it up (their handlers, filters,
    a test's); to the gateway's own handler directly otherwise: the same line, without a log record made
    and routed for each request (measured: a fifth of a short request's cost in the bench)."""
    handlers = logger.handlers
    if (
        len(handlers) == 1
        and type(handlers[0]) is BatchedLines
        and not logger.filters
        and not logger.disabled
        and logger.level == logging.INFO
    ):
        handlers[0].add_line(line)
    else:
        logger.info(line)


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    if value is True or value is False:
        return "true" if value else "false"
    if not isinstance(value, str):
        return str(value)  # a number
    shown = _shown_texts.get(value)
    if shown is None:
        # A path is the client's: quoted and escaped unless plain, so that it can't end the line or fake a
        # field.
        shown = value if _BARE.fullmatch(value) else json.dumps(value)
        if len(_shown_texts) >= MAX_TEXTS_KEPT:
            _shown_texts.clear()
        _shown_texts[value] = shown
    return shown


# The same few texts come back on every line (methods, paths, routes, models, hosts, bands): each is checked
# and quoted once, then looked up. Bounded, as paths are the clients' to choose.
MAX_TEXTS_KEPT = 4096
_shown_texts: dict[str, str] = {}


def _static_paths(routes: list[Any]) -> frozenset[str]:
    paths = set()
    for route in routes:
        for member in getattr(route, "routes", None) or [route]:  # the relay routes are one entry
            template = getattr(member, "path_format", None)
            if isinstance(template, str) and "{" not in template:
                paths.add(template)
    return frozenset(paths)
