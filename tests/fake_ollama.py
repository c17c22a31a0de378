"""A fake Ollama server that speaks Ollama's real wire format, for the gateway's tests.

The gateway must be invisible to Ollama's own clients, so its tests need an upstream that behaves like Ollama
on the wire: NDJSON streams flushed line by line, nothing sent before the model is "loaded", mid-stream
`{"error"}` lines, 403 for a foreign Host, gin's plain-text 404/405, OpenAI-shaped errors on /v1.

It runs aiohttp on 127.0.0.1 in a background thread with its own event loop, so synchronous tests can start
it, point the gateway at `url`, and inspect `requests` and `streams` afterwards.

Bodies are read as Ollama reads them, with Go's `encoding/json` rules (`tests.go_reader`): keys match fields
case-insensitively, the last duplicate wins, `null` leaves a string alone. Each request records the model the
fake resolved, so tests can check which model "Ollama" actually ran.

Behaviour is steered per request through the body's `options` object (`fake_tokens`, `fake_interval`,
`fake_load`, `fake_error_after`, `fake_reset_after`, `fake_hang_after`, `fake_garbage`, `fake_echo`), so
concurrent tests sharing one server never interfere. OpenAI-style bodies may carry the same `options` object.
"""

import asyncio
import copy
import hashlib
import itertools
import json
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web

from tests.go_reader import ANY, STRING, GoBindError, bind, trim_space

DEFAULT_VERSION = "0.12.3"
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
MODEL_ERROR_MESSAGE = "an error was encountered while running the model: unexpected EOF"
DEFAULT_TOKENS = ("Hello", ",", " world", "!")

NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"
JSON_UTF8 = "application/json; charset=utf-8"

# Bodies may hold several MB of base64 images; blobs bypass this limit because they are streamed.
MAX_BODY_BYTES = 1 << 30
BLOB_READ_CHUNK = 1 << 16
EMBEDDING_SIZE = 16
# Several hundred tests may connect at once; the default backlog of 128 would stall some of them.
LISTEN_BACKLOG = 1024
# Hung handlers are cancelled after this grace period when the server stops.
SHUTDOWN_GRACE_SECONDS = 0.1
START_TIMEOUT_SECONDS = 10.0

_BLOB_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")


@dataclass
class RecordedRequest:
    """One request as the fake received it (blob uploads are streamed, so their body is recorded empty)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    model: str | None = None  # the model the request named, as Ollama resolved it (None: none was read)


RECORDED = web.RequestKey("recorded", RecordedRequest)


@dataclass
class StreamRecord:
    """What happened to one streamed response, for tests about pacing, cancellation and disconnects.

    `client_gone_at` is also set when `stop()` cancels a stream still running; a `fake_reset_after` abort is
    the fake's own doing and leaves it None.
    """

    path: str
    model: str
    started_at: float
    lines_sent: int = 0
    finished: bool = False
    client_gone_at: float | None = None
    ended: threading.Event = field(default_factory=threading.Event, repr=False, compare=False)


class ApiError(Exception):
    """An error answered as JSON; the middleware picks Ollama's or OpenAI's shape from the path."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Knobs:
    """Per-request behaviour, read from the request body's `options` object."""

    tokens: int = len(DEFAULT_TOKENS)
    interval: float = 0.01
    load: float = 0.0
    fault: str | None = None
    fault_after: int = 0
    garbage: bool = False
    echo: bool = False

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> "Knobs":
        options = body.get("options")
        if not isinstance(options, dict):
            options = {}
        try:
            fault_after, fault = cls._first_fault(options)
            return cls(
                tokens=int(options.get("fake_tokens", cls.tokens)),
                interval=float(options.get("fake_interval", cls.interval)),
                load=float(options.get("fake_load", cls.load)),
                fault=fault,
                fault_after=fault_after,
                garbage=bool(options.get("fake_garbage", False)),
                echo=bool(options.get("fake_echo", False)),
            )
        except (TypeError, ValueError) as error:
            # A typo in a test's knobs should fail that test clearly, not as an anonymous 500.
            raise ApiError(400, f"invalid fake_* option: {error}") from None

    @staticmethod
    def _first_fault(options: dict[str, Any]) -> tuple[int, str | None]:
        """The earliest of the requested faults; one stream can only fail once."""
        keys = {"error": "fake_error_after", "reset": "fake_reset_after", "hang": "fake_hang_after"}
        faults = sorted(
            (int(options[key]), kind) for kind, key in keys.items() if options.get(key) is not None
        )
        return faults[0] if faults else (0, None)

    def content(self, echo_text: str) -> list[str]:
        """The tokens the "model" produces: the canned greeting, or the echoed input in one token."""
        if self.echo:
            return [echo_text]
        return [DEFAULT_TOKENS[index % len(DEFAULT_TOKENS)] for index in range(self.tokens)]

    def fault_index(self, item_count: int) -> int | None:
        """Where the fault strikes; clamped so a fault past the last item still fires before the end."""
        if self.fault is None:
            return None
        return max(0, min(self.fault_after, item_count))


@dataclass
class Reply:
    """One answer in one dialect (Ollama NDJSON, OpenAI SSE, ...), streamed or whole.

    Lines are built when written, so timestamps and durations are those of the moment they leave.
    """

    content_type: str
    items: list[Any]
    line: Callable[[Any], bytes]
    closing: Callable[[], list[bytes]]
    error_line: bytes
    whole: Callable[[], dict[str, Any]]
    opening: Callable[[], list[bytes]] = list
    on_success: Callable[[], None] | None = None


def ndjson_line(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


def sse_event(obj: Any, event: str | None = None) -> bytes:
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


def json_response(obj: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(obj, separators=(",", ":")).encode(),
        headers={"Content-Type": JSON_UTF8},
    )


def plain_response(status: int, text: str) -> web.Response:
    """gin's own 404/405 pages are bare `text/plain`, without a charset."""
    return web.Response(status=status, body=text.encode(), headers={"Content-Type": "text/plain"})


def openai_error(status: int, message: str) -> dict[str, Any]:
    """Ollama's openai.NewError: the type follows the status code."""
    kinds = {400: "invalid_request_error", 404: "not_found_error"}
    return {
        "error": {"message": message, "type": kinds.get(status, "api_error"), "param": None, "code": None}
    }


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def unix_seconds(stamp: str) -> int:
    """Seconds for an RFC 3339 stamp; Go writes nanoseconds, which Python's parser refuses."""
    try:
        return int(datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", stamp)).timestamp())
    except ValueError:
        return 0


def text_of(content: Any) -> str:
    """Message content as text: a string, or OpenAI's list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def count_prompt_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def fake_embedding(text: str) -> list[float]:
    """A deterministic vector, so equal inputs give equal embeddings as with a real model."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(byte / 255 - 0.5, 6) for byte in digest[:EMBEDDING_SIZE]]


def embedding_inputs(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list):
        return [str(item) for item in value]
    return [str(value)]


def model_entry(
    name: str, *, family: str, families: list[str], parameter_size: str, quantization: str, size: int
) -> dict[str, Any]:
    """One model exactly as /api/tags lists it."""
    return {
        "name": name,
        "model": name,
        "modified_at": "2025-09-30T10:12:45.123456789+02:00",
        "size": size,
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": families,
            "parameter_size": parameter_size,
            "quantization_level": quantization,
        },
    }


def default_models() -> list[dict[str, Any]]:
    return [
        model_entry(
            "llama3.2:1b",
            family="llama",
            families=["llama"],
            parameter_size="1.2B",
            quantization="Q8_0",
            size=1_321_098_329,
        ),
        model_entry(
            "llava:7b",
            family="llama",
            families=["llama", "clip"],
            parameter_size="7B",
            quantization="Q4_0",
            size=4_733_363_377,
        ),
    ]


def timings(started: float, knobs: Knobs, prompt_tokens: int, eval_count: int) -> dict[str, int]:
    """Ollama's final counters, in nanoseconds, consistent with the time the fake actually took."""
    total = int((time.monotonic() - started) * 1e9)
    load = int(knobs.load * 1e9)
    evaluation = int(knobs.interval * eval_count * 1e9)
    return {
        "total_duration": total,
        "load_duration": load,
        "prompt_eval_count": prompt_tokens,
        "prompt_eval_duration": max(total - load - evaluation, 0),
        "eval_count": eval_count,
        "eval_duration": evaluation,
    }


def chat_reply(model: str, tokens: list[str], knobs: Knobs, started: float, prompt_tokens: int) -> Reply:
    def message(content: str) -> dict[str, Any]:
        return {
            "model": model,
            "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": content},
        }

    def final(content: str) -> dict[str, Any]:
        counters = timings(started, knobs, prompt_tokens, len(tokens))
        return {**message(content), "done": True, "done_reason": "stop", **counters}

    return Reply(
        content_type=NDJSON,
        items=tokens,
        line=lambda token: ndjson_line({**message(token), "done": False}),
        closing=lambda: [ndjson_line(final(""))],
        error_line=ndjson_line({"error": MODEL_ERROR_MESSAGE}),
        whole=lambda: final("".join(tokens)),
    )


def generate_reply(model: str, tokens: list[str], knobs: Knobs, started: float, prompt_tokens: int) -> Reply:
    def response(text: str) -> dict[str, Any]:
        return {"model": model, "created_at": now_rfc3339(), "response": text}

    def final(text: str) -> dict[str, Any]:
        counters = timings(started, knobs, prompt_tokens, len(tokens))
        return {**response(text), "done": True, "done_reason": "stop", "context": [1, 2, 3], **counters}

    return Reply(
        content_type=NDJSON,
        items=tokens,
        line=lambda token: ndjson_line({**response(token), "done": False}),
        closing=lambda: [ndjson_line(final(""))],
        error_line=ndjson_line({"error": MODEL_ERROR_MESSAGE}),
        whole=lambda: final("".join(tokens)),
    )


def openai_usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def openai_chat_reply(model: str, tokens: list[str], prompt_tokens: int, include_usage: bool) -> Reply:
    # Ollama's ids are "chatcmpl-" plus a small random number, not OpenAI's long random strings.
    head = {"id": f"chatcmpl-{random.randrange(999)}", "model": model, "system_fingerprint": "fp_ollama"}
    usage = openai_usage(prompt_tokens, len(tokens))

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {**head, "object": "chat.completion.chunk", "created": int(time.time()), "choices": choices}

    def delta(content: str, finish_reason: str | None) -> dict[str, Any]:
        message = {"role": "assistant", "content": content}
        return chunk([{"index": 0, "delta": message, "finish_reason": finish_reason}])

    def closing() -> list[bytes]:
        lines = [sse_event(delta("", "stop"))]
        if include_usage:
            lines.append(sse_event({**chunk([]), "usage": usage}))
        return [*lines, b"data: [DONE]\n\n"]

    def whole() -> dict[str, Any]:
        message = {"role": "assistant", "content": "".join(tokens)}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return {
            **head,
            "object": "chat.completion",
            "created": int(time.time()),
            "choices": [choice],
            "usage": usage,
        }

    return Reply(
        content_type=EVENT_STREAM,
        items=tokens,
        line=lambda token: sse_event(delta(token, None)),
        closing=closing,
        error_line=sse_event(openai_error(500, MODEL_ERROR_MESSAGE)),
        whole=whole,
    )


def openai_completion_reply(model: str, tokens: list[str], prompt_tokens: int) -> Reply:
    head = {"id": f"cmpl-{random.randrange(999)}", "model": model, "system_fingerprint": "fp_ollama"}

    def completion(text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "finish_reason": finish_reason}
        return {**head, "object": "text_completion", "created": int(time.time()), "choices": [choice]}

    return Reply(
        content_type=EVENT_STREAM,
        items=tokens,
        line=lambda token: sse_event(completion(token, None)),
        closing=lambda: [sse_event(completion("", "stop")), b"data: [DONE]\n\n"],
        error_line=sse_event(openai_error(500, MODEL_ERROR_MESSAGE)),
        whole=lambda: {
            **completion("".join(tokens), "stop"),
            "usage": openai_usage(prompt_tokens, len(tokens)),
        },
    )


def responses_reply(model: str, tokens: list[str], prompt_tokens: int) -> Reply:
    """A minimal Responses API answer; streamed as typed SSE events, which end without `[DONE]`."""
    response_id = f"resp_{random.randrange(1 << 32):08x}"
    message_id = f"msg_{random.randrange(1 << 32):08x}"
    created = int(time.time())
    text = "".join(tokens)
    sequence = itertools.count()

    def response(status: str, output_text: str | None) -> dict[str, Any]:
        output = []
        if output_text is not None:
            part = {"type": "output_text", "text": output_text, "annotations": []}
            output.append(
                {
                    "id": message_id,
                    "type": "message",
                    "status": status,
                    "role": "assistant",
                    "content": [part],
                }
            )
        usage = {"input_tokens": prompt_tokens, "output_tokens": len(tokens)}
        return {
            "id": response_id,
            "object": "response",
            "created_at": created,
            "status": status,
            "model": model,
            "output": output,
            "usage": {**usage, "total_tokens": prompt_tokens + len(tokens)},
        }

    def event(kind: str, **fields: Any) -> bytes:
        return sse_event({"type": kind, "sequence_number": next(sequence), **fields}, event=kind)

    def delta(token: str) -> bytes:
        place = {"item_id": message_id, "output_index": 0, "content_index": 0}
        return event("response.output_text.delta", **place, delta=token)

    return Reply(
        content_type=EVENT_STREAM,
        items=tokens,
        line=delta,
        opening=lambda: [event("response.created", response=response("in_progress", None))],
        closing=lambda: [event("response.completed", response=response("completed", text))],
        error_line=sse_event({"type": "error", "message": MODEL_ERROR_MESSAGE, "code": None}, event="error"),
        whole=lambda: response("completed", text),
    )


def progress_reply(kind: str, name: str, on_success: Callable[[], None] | None) -> Reply:
    """Status lines of a pull, push or create, as `ollama pull` and the clients' progress bars read them."""
    digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
    total = 1_000_000
    transfer = [
        {"status": f"{kind} {digest[7:19]}", "digest": digest, "total": total, "completed": total * step // 4}
        for step in range(1, 5)
    ]
    steps_of: dict[str, list[dict[str, object]]] = {
        "pulling": [{"status": "pulling manifest"}, *transfer, {"status": "verifying sha256 digest"}],
        "pushing": [{"status": "retrieving manifest"}, *transfer, {"status": "pushing manifest"}],
        "creating": [{"status": "gathering model components"}, {"status": f"using existing layer {digest}"}],
    }
    steps = steps_of[kind]
    items = [*steps, {"status": "writing manifest"}] if kind != "pushing" else steps
    return Reply(
        content_type=NDJSON,
        items=items,
        line=ndjson_line,
        closing=lambda: [ndjson_line({"status": "success"})],
        error_line=ndjson_line({"error": MODEL_ERROR_MESSAGE}),
        whole=lambda: {"status": "success"},
        on_success=on_success,
    )


def garbage_response() -> web.Response:
    return web.Response(body=b"not json at all\n", headers={"Content-Type": NDJSON})


@dataclass(frozen=True)
class GoStruct:
    """A request struct Ollama binds a body into: its name, the fields the fake reads (tag -> STRING or ANY),
    and the fields naming the model, in the order the handler prefers them."""

    name: str
    fields: dict[str, str]
    model_fields: tuple[str, ...] = ("model",)


# api/types.go and openai/*.go. `options` stands in for the fake's knobs on every surface. ShowRequest,
# PullRequest, PushRequest, CreateRequest and DeleteRequest still take the deprecated `name`: the handlers
# use `model` unless it is empty.
_KNOBS: dict[str, str] = {"options": ANY, "stream": ANY}
_MODEL_OR_NAME = ("model", "name")
CHAT_REQUEST = GoStruct("api.ChatRequest", {"model": STRING, "messages": ANY, **_KNOBS})
GENERATE_REQUEST = GoStruct("api.GenerateRequest", {"model": STRING, "prompt": STRING, **_KNOBS})
EMBED_REQUEST = GoStruct("api.EmbedRequest", {"model": STRING, "input": ANY, **_KNOBS})
EMBEDDING_REQUEST = GoStruct("api.EmbeddingRequest", {"model": STRING, "prompt": STRING, **_KNOBS})
SHOW_REQUEST = GoStruct("api.ShowRequest", {"model": STRING, "name": STRING, **_KNOBS}, _MODEL_OR_NAME)
PULL_REQUEST = GoStruct("api.PullRequest", {"model": STRING, "name": STRING, **_KNOBS}, _MODEL_OR_NAME)
PUSH_REQUEST = GoStruct("api.PushRequest", {"model": STRING, "name": STRING, **_KNOBS}, _MODEL_OR_NAME)
CREATE_REQUEST = GoStruct(
    "api.CreateRequest", {"model": STRING, "name": STRING, "from": STRING, **_KNOBS}, _MODEL_OR_NAME
)
DELETE_REQUEST = GoStruct("api.DeleteRequest", {"model": STRING, "name": STRING}, _MODEL_OR_NAME)
COPY_REQUEST = GoStruct("api.CopyRequest", {"source": STRING, "destination": STRING}, ())
OPENAI_CHAT_REQUEST = GoStruct(
    "openai.ChatCompletionRequest", {"model": STRING, "messages": ANY, "stream_options": ANY, **_KNOBS}
)
OPENAI_COMPLETION_REQUEST = GoStruct("openai.CompletionRequest", {"model": STRING, "prompt": ANY, **_KNOBS})
OPENAI_EMBED_REQUEST = GoStruct("openai.EmbedRequest", {"model": STRING, "input": ANY, **_KNOBS})
OPENAI_RESPONSES_REQUEST = GoStruct("openai.ResponsesRequest", {"model": STRING, "input": ANY, **_KNOBS})


async def read_json(request: web.Request, struct: GoStruct) -> dict[str, Any]:
    """The body bound into `struct` as Go binds it, failing with gin's 400 as Ollama does."""
    try:
        return bind(await request.read(), struct.fields, struct.name)
    except GoBindError as error:
        raise ApiError(400, str(error)) from None


def requested_model(request: web.Request, body: dict[str, Any], struct: GoStruct) -> str:
    """The model the handler uses: the first of its model fields that is not empty, trimmed as Ollama's
    model reference parser trims it. Recorded on the request, for tests to see what "Ollama" ran."""
    name = trim_space(next((body[field] for field in struct.model_fields if body.get(field)), ""))
    if not name:
        raise ApiError(400, "model is required")
    recorded = request.get(RECORDED)
    if recorded is not None:
        recorded.model = name
    return name


def model_not_found(request: web.Request, name: str) -> ApiError:
    if request.path.startswith("/v1/"):
        return ApiError(404, f'model "{name}" not found, try pulling it first')
    return ApiError(404, f"model '{name}' not found")


def header_dict(request: web.Request) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        key = name.lower()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return headers


def is_streamed_upload(request: web.Request) -> bool:
    return request.method == "POST" and request.path.startswith("/api/blobs/")


async def send_line(response: web.StreamResponse, record: StreamRecord, line: bytes) -> None:
    await response.write(line)
    record.lines_sent += 1


def abort_connection(request: web.Request) -> None:
    """Drop the TCP connection without a FIN, so the peer sees a connection reset mid-response."""
    if request.transport is not None:
        request.transport.abort()


async def hang_forever() -> None:
    await asyncio.Event().wait()


class FakeOllama:
    """A fake Ollama on 127.0.0.1:<free port>, served from a background thread.

    Use `start()`/`stop()` (or `with FakeOllama() as fake:`), point the gateway at `url`, then inspect
    `requests` and `streams`. `reset()` between tests restores the defaults.
    """

    def __init__(self) -> None:
        self.url = ""
        self.host_header = ""
        self.requests: list[RecordedRequest] = []
        self.streams: list[StreamRecord] = []
        self.models: list[dict[str, Any]] = default_models()
        self.version = DEFAULT_VERSION
        self.blobs: dict[str, int] = {}
        self.blob_bytes_received = 0
        self._busy = False
        # Knobs applied to every request that doesn't set them itself (see `_knobs`).
        self.default_options: dict[str, Any] = {}
        self._allowed_hosts: set[str] = set()
        self._lock = threading.Lock()
        self._stream_added = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._startup_error: BaseException | None = None

    # -- lifecycle, called from the test's thread --------------------------------------------------------

    def start(self) -> "FakeOllama":
        """Bind a free loopback port and return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("FakeOllama is already running")
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="fake-ollama", daemon=True)
        self._thread.start()
        if not ready.wait(START_TIMEOUT_SECONDS):
            raise TimeoutError("fake Ollama did not start")
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise self._startup_error
        return self

    def stop(self) -> None:
        """Close the listener and every connection (hung streams are cancelled), then join the thread."""
        if self._thread is None:
            return
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()
        self._thread = None

    def __enter__(self) -> "FakeOllama":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget what was recorded and restore the default models, version, blobs and busy flag."""
        with self._lock:
            self.requests.clear()
            self.streams.clear()
        self.models = default_models()
        self.version = DEFAULT_VERSION
        self.blobs = {}
        self.blob_bytes_received = 0
        self._busy = False
        self.default_options = {}

    async def _model_request(
        self, request: web.Request, struct: GoStruct
    ) -> tuple[float, dict[str, Any], str, Knobs]:
        """What every model call starts with: when it arrived, its body, its (known) model, its knobs."""
        started = time.monotonic()
        body = await read_json(request, struct)
        return started, body, self._known_model(request, body, struct), self._knobs(body)

    def _knobs(self, body: dict[str, Any]) -> Knobs:
        """The request's knobs over `default_options`: lets a client that only sends real Ollama options
        (such as the web page) still get a slow, echoing or failing model."""
        options = body.get("options")
        if not isinstance(options, dict):
            options = {}
        return Knobs.from_body({**body, "options": {**self.default_options, **options}})

    def set_busy(self, busy: bool) -> None:
        """Answer every /api/* and /v1/* request with Ollama's 503 "queue full" error."""
        self._busy = busy

    def wait_for_stream_end(self, timeout: float) -> StreamRecord:
        """Block until the most recent stream ended, waiting first for one to begin if none has."""
        deadline = time.monotonic() + timeout
        with self._stream_added:
            if not self._stream_added.wait_for(lambda: self.streams, timeout):
                raise TimeoutError("no stream began")
            record = self.streams[-1]
        if not record.ended.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"stream {record.path} did not end")
        return record

    def _run(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        runner = web.AppRunner(
            self._build_app(),
            # Cancel the handler the moment the peer closes, so disconnects are seen without writing.
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=SHUTDOWN_GRACE_SECONDS,
        )
        try:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0, backlog=LISTEN_BACKLOG).start()
            port = runner.addresses[0][1]
        except BaseException as error:
            self._startup_error = error
            ready.set()
            await runner.cleanup()
            return
        self.host_header = f"127.0.0.1:{port}"
        self.url = f"http://{self.host_header}"
        self._allowed_hosts = {self.host_header, f"localhost:{port}"}
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    # -- the application -----------------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._gatekeeper])
        router = app.router
        router.add_get("/", self._root)
        router.add_get("/api/version", self._version)
        router.add_get("/api/tags", self._tags)
        router.add_get("/api/ps", self._ps, allow_head=False)
        router.add_post("/api/show", self._show)
        router.add_post("/api/chat", self._chat)
        router.add_post("/api/generate", self._generate)
        router.add_post("/api/embed", self._embed)
        router.add_post("/api/embeddings", self._embeddings)
        router.add_post("/api/pull", self._pull)
        router.add_post("/api/push", self._push)
        router.add_post("/api/create", self._create)
        router.add_post("/api/copy", self._copy)
        router.add_delete("/api/delete", self._delete)
        router.add_head("/api/blobs/{digest}", self._head_blob)
        router.add_post("/api/blobs/{digest}", self._upload_blob)
        router.add_post("/v1/chat/completions", self._openai_chat)
        router.add_post("/v1/completions", self._openai_completions)
        router.add_post("/v1/embeddings", self._openai_embeddings)
        router.add_post("/v1/responses", self._openai_responses)
        router.add_get("/v1/models", self._openai_models, allow_head=False)
        router.add_get("/v1/models/{model}", self._openai_model, allow_head=False)
        return app

    @web.middleware
    async def _gatekeeper(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Record the request, then apply Ollama's Host check, queue limit and error shapes."""
        body = b"" if is_streamed_upload(request) else await request.read()
        request[RECORDED] = self._record(request, body)
        # Ollama bound to loopback refuses foreign Host headers (DNS-rebinding protection).
        if request.headers.get("Host", "").lower() not in self._allowed_hosts:
            return web.Response(status=403)
        try:
            if self._busy and self._is_queued(request):
                raise ApiError(503, BUSY_MESSAGE)
            return await handler(request)
        except ApiError as error:
            return self._error_response(request, error)
        except web.HTTPNotFound:
            return plain_response(404, "404 page not found")
        except web.HTTPMethodNotAllowed:
            return plain_response(405, "405 method not allowed")

    def _record(self, request: web.Request, body: bytes) -> RecordedRequest:
        recorded = RecordedRequest(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=header_dict(request),
            body=body,
        )
        with self._lock:
            self.requests.append(recorded)
        return recorded

    @staticmethod
    def _is_queued(request: web.Request) -> bool:
        routed = request.match_info.http_exception is None
        return routed and request.path.startswith(("/api/", "/v1/"))

    @staticmethod
    def _error_response(request: web.Request, error: ApiError) -> web.Response:
        # Ollama's OpenAI middleware rewrites every error on /v1 into OpenAI's nested shape.
        if request.path.startswith("/v1/"):
            return json_response(openai_error(error.status, error.message), error.status)
        return json_response({"error": error.message}, error.status)

    def _find_model(self, name: str) -> dict[str, Any] | None:
        """Look a model up as Ollama does, where a name without a tag means `:latest`."""
        wanted = {name, f"{name}:latest"} if ":" not in name else {name}
        return next((entry for entry in self.models if entry.get("name") in wanted), None)

    def _known_model(self, request: web.Request, body: dict[str, Any], struct: GoStruct) -> str:
        name = requested_model(request, body, struct)
        if self._find_model(name) is None:
            raise model_not_found(request, name)
        return name

    def _add_model(self, name: str, template: dict[str, Any] | None = None) -> None:
        if self._find_model(name) is not None:
            return
        if template is None:
            template = self.models[0] if self.models else default_models()[0]
        entry = copy.deepcopy(template)
        entry.update(name=name, model=name, modified_at=now_rfc3339())
        self.models.append(entry)

    # -- answering with generated content ----------------------------------------------------------------

    async def _answer(
        self, request: web.Request, model: str, knobs: Knobs, streaming: bool, reply: Reply
    ) -> web.StreamResponse:
        if knobs.garbage:
            return garbage_response()
        if streaming:
            return await self._stream(request, model, knobs, reply)
        return await self._whole(request, knobs, reply)

    async def _stream(
        self, request: web.Request, model: str, knobs: Knobs, reply: Reply
    ) -> web.StreamResponse:
        record = StreamRecord(path=request.path, model=model, started_at=time.monotonic())
        with self._stream_added:
            self.streams.append(record)
            self._stream_added.notify_all()
        response = web.StreamResponse(headers={"Content-Type": reply.content_type})
        try:
            # Ollama sends nothing, not even headers, until the model is loaded and the prompt evaluated.
            await asyncio.sleep(knobs.load)
            await response.prepare(request)
            await self._write_reply(request, response, record, knobs, reply)
        except asyncio.CancelledError:
            record.client_gone_at = time.monotonic()
            raise
        except ConnectionResetError:
            record.client_gone_at = time.monotonic()
        finally:
            record.ended.set()
        return response

    async def _write_reply(
        self,
        request: web.Request,
        response: web.StreamResponse,
        record: StreamRecord,
        knobs: Knobs,
        reply: Reply,
    ) -> None:
        for line in reply.opening():
            await send_line(response, record, line)
        fault_at = knobs.fault_index(len(reply.items))
        # One pass per item plus one for the closing lines, pausing between them like a model emitting tokens.
        for index in range(len(reply.items) + 1):
            if index:
                await asyncio.sleep(knobs.interval)
            if index == fault_at:
                await self._stream_fault(request, response, record, knobs, reply)
                return
            if index < len(reply.items):
                await send_line(response, record, reply.line(reply.items[index]))
        for line in reply.closing():
            await send_line(response, record, line)
        record.finished = True
        if reply.on_success is not None:
            reply.on_success()

    @staticmethod
    async def _stream_fault(
        request: web.Request, response: web.StreamResponse, record: StreamRecord, knobs: Knobs, reply: Reply
    ) -> None:
        if knobs.fault == "error":
            # Status 200 is already sent: Ollama reports the failure as the stream's last line.
            await send_line(response, record, reply.error_line)
        elif knobs.fault == "reset":
            abort_connection(request)
        else:
            await hang_forever()

    @staticmethod
    async def _whole(request: web.Request, knobs: Knobs, reply: Reply) -> web.StreamResponse:
        """The answer to `"stream": false`: the same work and faults, delivered as one object."""
        fault_at = knobs.fault_index(len(reply.items))
        produced = len(reply.items) if fault_at is None else fault_at
        await asyncio.sleep(knobs.load + knobs.interval * produced)
        if knobs.fault == "error":
            raise ApiError(500, MODEL_ERROR_MESSAGE)
        if knobs.fault == "reset":
            abort_connection(request)
            return web.Response()
        if knobs.fault == "hang":
            await hang_forever()
        if reply.on_success is not None:
            reply.on_success()
        return json_response(reply.whole())

    # -- Ollama's native API -------------------------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return json_response({"version": self.version})

    async def _tags(self, request: web.Request) -> web.Response:
        return json_response({"models": self.models})

    async def _ps(self, request: web.Request) -> web.Response:
        expires_at = (datetime.now(UTC) + timedelta(minutes=5)).isoformat()
        running = [
            {
                **{key: entry[key] for key in ("name", "model", "size", "digest", "details") if key in entry},
                "expires_at": expires_at,
                "size_vram": entry.get("size", 0),
                "context_length": 4096,
            }
            for entry in self.models
        ]
        return json_response({"models": running})

    async def _show(self, request: web.Request) -> web.Response:
        body = await read_json(request, SHOW_REQUEST)
        name = requested_model(request, body, SHOW_REQUEST)
        entry = self._find_model(name)
        if entry is None:
            raise model_not_found(request, name)
        details = entry.get("details", {})
        family = details.get("family", "llama")
        capabilities = (
            ["completion", "vision"] if "clip" in (details.get("families") or []) else ["completion"]
        )
        return json_response(
            {
                "license": "",
                "modelfile": f'# Modelfile generated by "ollama show"\nFROM {entry["name"]}\n'
                'TEMPLATE "{{ .Prompt }}"\n',
                "parameters": 'stop                           "<|eot_id|>"',
                "template": "{{ .Prompt }}",
                "details": details,
                "model_info": {
                    "general.architecture": family,
                    "general.parameter_count": entry.get("size", 0),
                    f"{family}.context_length": 131072,
                    f"{family}.embedding_length": 2048,
                },
                "capabilities": capabilities,
                "modified_at": entry.get("modified_at"),
            }
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        started, body, model, knobs = await self._model_request(request, CHAT_REQUEST)
        messages = [message for message in body.get("messages") or [] if isinstance(message, dict)]
        last = text_of(messages[-1].get("content")) if messages else ""
        prompt = " ".join(text_of(message.get("content")) for message in messages)
        reply = chat_reply(model, knobs.content(last), knobs, started, count_prompt_tokens(prompt))
        return await self._answer(request, model, knobs, body.get("stream") is not False, reply)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        started, body, model, knobs = await self._model_request(request, GENERATE_REQUEST)
        prompt = str(body.get("prompt") or "")
        reply = generate_reply(model, knobs.content(prompt), knobs, started, count_prompt_tokens(prompt))
        return await self._answer(request, model, knobs, body.get("stream") is not False, reply)

    async def _embed(self, request: web.Request) -> web.Response:
        started, body, model, knobs = await self._model_request(request, EMBED_REQUEST)
        await asyncio.sleep(knobs.load)
        inputs = embedding_inputs(body.get("input"))
        counters = timings(started, knobs, sum(count_prompt_tokens(text) for text in inputs), 0)
        return json_response(
            {
                "model": model,
                "embeddings": [fake_embedding(text) for text in inputs],
                "total_duration": counters["total_duration"],
                "load_duration": counters["load_duration"],
                "prompt_eval_count": counters["prompt_eval_count"],
            }
        )

    async def _embeddings(self, request: web.Request) -> web.Response:
        body = await read_json(request, EMBEDDING_REQUEST)
        self._known_model(request, body, EMBEDDING_REQUEST)
        await asyncio.sleep(self._knobs(body).load)
        prompt = body.get("prompt")
        return json_response({"embedding": fake_embedding(str(prompt)) if prompt else []})

    async def _pull(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, PULL_REQUEST)
        name = requested_model(request, body, PULL_REQUEST)
        return await self._progress(request, body, "pulling", name, lambda: self._add_model(name))

    async def _push(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, PUSH_REQUEST)
        return await self._progress(
            request, body, "pushing", self._known_model(request, body, PUSH_REQUEST), None
        )

    async def _create(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, CREATE_REQUEST)
        name = requested_model(request, body, CREATE_REQUEST)
        base = self._find_model(str(body.get("from") or ""))
        return await self._progress(request, body, "creating", name, lambda: self._add_model(name, base))

    async def _progress(
        self,
        request: web.Request,
        body: dict[str, Any],
        kind: str,
        name: str,
        on_success: Callable[[], None] | None,
    ) -> web.StreamResponse:
        reply = progress_reply(kind, name, on_success)
        streaming = body.get("stream") is not False
        return await self._answer(request, name, self._knobs(body), streaming, reply)

    async def _copy(self, request: web.Request) -> web.Response:
        body = await read_json(request, COPY_REQUEST)
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not source:
            raise ApiError(400, f'source "{source or ""}" is invalid')
        if not isinstance(destination, str) or not destination:
            raise ApiError(400, f'destination "{destination or ""}" is invalid')
        entry = self._find_model(source)
        if entry is None:
            raise model_not_found(request, source)
        self._add_model(destination, entry)
        return web.Response()

    async def _delete(self, request: web.Request) -> web.Response:
        body = await read_json(request, DELETE_REQUEST)
        name = requested_model(request, body, DELETE_REQUEST)
        entry = self._find_model(name)
        if entry is None:
            raise model_not_found(request, name)
        self.models = [other for other in self.models if other is not entry]
        return web.Response()

    async def _head_blob(self, request: web.Request) -> web.Response:
        digest = self._blob_digest(request)
        if digest not in self.blobs:
            raise ApiError(404, f'blob "{digest}" not found')
        return web.Response()

    async def _upload_blob(self, request: web.Request) -> web.Response:
        """Hash the upload as it arrives: blobs can be many GB, so the body is never held in memory."""
        expected = self._blob_digest(request)
        if expected in self.blobs:
            # Ollama answers at once for a blob it has, without reading the body.
            return web.Response()
        hasher = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_chunked(BLOB_READ_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
            self.blob_bytes_received += len(chunk)
        actual = f"sha256:{hasher.hexdigest()}"
        if actual != expected:
            raise ApiError(400, f'digest mismatch, expected "{expected}", got "{actual}"')
        self.blobs[actual] = size
        return web.Response(status=201)

    @staticmethod
    def _blob_digest(request: web.Request) -> str:
        match = _BLOB_DIGEST.match(request.match_info["digest"])
        if match is None:
            raise ApiError(400, "invalid digest format")
        return f"sha256:{match.group(1).lower()}"

    # -- the OpenAI-compatible API -------------------------------------------------------------------------

    async def _openai_chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, OPENAI_CHAT_REQUEST)
        model = self._known_model(request, body, OPENAI_CHAT_REQUEST)
        knobs = self._knobs(body)
        messages = [message for message in body.get("messages") or [] if isinstance(message, dict)]
        last = text_of(messages[-1].get("content")) if messages else ""
        prompt = " ".join(text_of(message.get("content")) for message in messages)
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))
        reply = openai_chat_reply(model, knobs.content(last), count_prompt_tokens(prompt), include_usage)
        return await self._answer(request, model, knobs, body.get("stream") is True, reply)

    async def _openai_completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, OPENAI_COMPLETION_REQUEST)
        model = self._known_model(request, body, OPENAI_COMPLETION_REQUEST)
        knobs = self._knobs(body)
        prompt = str(body.get("prompt") or "")
        reply = openai_completion_reply(model, knobs.content(prompt), count_prompt_tokens(prompt))
        return await self._answer(request, model, knobs, body.get("stream") is True, reply)

    async def _openai_responses(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, OPENAI_RESPONSES_REQUEST)
        model = self._known_model(request, body, OPENAI_RESPONSES_REQUEST)
        knobs = self._knobs(body)
        given = body.get("input")
        if isinstance(given, list) and given:
            last = given[-1]
            given = text_of(last.get("content")) if isinstance(last, dict) else str(last)
        text = given if isinstance(given, str) else ""
        reply = responses_reply(model, knobs.content(text), count_prompt_tokens(text))
        return await self._answer(request, model, knobs, body.get("stream") is True, reply)

    async def _openai_embeddings(self, request: web.Request) -> web.Response:
        body = await read_json(request, OPENAI_EMBED_REQUEST)
        model = self._known_model(request, body, OPENAI_EMBED_REQUEST)
        inputs = embedding_inputs(body.get("input"))
        data = [
            {"object": "embedding", "embedding": fake_embedding(text), "index": index}
            for index, text in enumerate(inputs)
        ]
        tokens = sum(count_prompt_tokens(text) for text in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return json_response({"object": "list", "data": data, "model": model, "usage": usage})

    async def _openai_models(self, request: web.Request) -> web.Response:
        return json_response({"object": "list", "data": [self._openai_model_entry(m) for m in self.models]})

    async def _openai_model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        entry = self._find_model(name)
        if entry is None:
            raise model_not_found(request, name)
        return json_response({**self._openai_model_entry(entry), "id": name})

    @staticmethod
    def _openai_model_entry(entry: dict[str, Any]) -> dict[str, Any]:
        name = entry.get("name", "")
        # Ollama reports the name's namespace as the owner, which is "library" for official models.
        owner = name.split("/")[-2] if name.count("/") >= 1 else "library"
        return {
            "id": name,
            "object": "model",
            "created": unix_seconds(entry.get("modified_at", "")),
            "owned_by": owner,
        }
