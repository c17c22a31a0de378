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

Each instance schedules model runs as Ollama does (server/sched.go, llm/llama_server.go); see `Scheduler`:

- A model that is not loaded takes `load_seconds` to load. Requests for a model being loaded wait for that one
  load. `max_loaded_models` unloads the least recently used idle model to make room, or waits for one to go
  idle (Ollama's OLLAMA_MAX_LOADED_MODELS). `/api/ps` lists the loaded models only. A new instance and
  `reset()` start with the default models loaded; `unload()` and `unload_all()` let a test start cold.
- A loaded model runs at most `num_parallel` requests at once (OLLAMA_NUM_PARALLEL; `model_parallel` per
  model). The others wait, unseen and without any limit, in a FIFO: strict arrival order, and a client that
  disconnects leaves it at once. The default, `None`, is unlimited, which keeps tests that share the session's
  fake independent of each other.
- Nothing is sent, not even headers, before a request has its runner and its slot and its prompt is evaluated
  (`prompt_eval_per_token` seconds per prompt token). `fake_load` is extra time one request spends before it
  gets its runner, on top of any model load: it counts in `load_duration` and holds no slot.
- The final counters are measured, as Ollama measures them: `load_duration` from the handler's start until
  the runner is obtained, then the wait for a slot, then `prompt_eval_duration`, then `eval_duration` (about
  `fake_interval` per token). So `total_duration - load_duration - prompt_eval_duration - eval_duration` is
  the time the request waited for a slot, which its `RecordedRequest` also holds as `slot_wait`. The /v1
  surfaces and the embedding endpoints use the same slots; pulls, pushes and creates use none.
- `model_stats(name)` tells a test, from its own thread, a model's loads, in-flight count, queue length,
  the most requests ever seen in flight at once, and the most ever sent to it at once (in flight or waiting
  in its hidden queue); `wait_until()` blocks until a condition on them holds.
"""

import asyncio
import contextlib
import copy
import hashlib
import itertools
import json
import random
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
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
# Ollama's defaults: a model stays loaded 5 minutes after its last request (OLLAMA_KEEP_ALIVE); num_ctx.
KEEP_ALIVE = timedelta(minutes=5)
CONTEXT_LENGTH = 4096
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
    # When the request got one of its model's slots (time.monotonic()), and how long it waited for it after
    # obtaining the runner; both None while it has none, and for good if it never ran.
    slot_at: float | None = None
    slot_wait: float | None = None


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
    cached_prompt: bool = False  # the prompt is in the cache: Ollama evaluates none of it

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
                cached_prompt=bool(options.get("fake_cached_prompt", False)),
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


def nanoseconds(seconds: float) -> int:
    return round(seconds * 1e9)


@dataclass
class Run:
    """One model request on its way through the scheduler, with the moments Ollama's counters are made of.

    `model` is the model's full name, the scheduler's key; the times are `time.monotonic()`.
    """

    model: str
    prompt_tokens: int
    started: float
    loaded_at: float = 0.0  # the runner was obtained (server/routes.go's checkpointLoaded)
    slot_at: float = 0.0  # one of the runner's slots was acquired (llm/llama_server.go's semaphore)
    prompt_done_at: float = 0.0

    def counters(self, eval_count: int) -> dict[str, int]:
        """Ollama's final counters, in nanoseconds, as of now: the phases add up to the total, except for the
        wait for a slot, which only `total_duration` includes."""
        now = time.monotonic()
        counters = {
            "total_duration": nanoseconds(now - self.started),
            "load_duration": nanoseconds(self.loaded_at - self.started),
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": nanoseconds(self.prompt_done_at - self.slot_at),
            "eval_count": eval_count,
            "eval_duration": nanoseconds(now - self.prompt_done_at),
        }
        # api.Metrics' fields are all `omitempty`: a prompt served whole from the cache has no count.
        return {name: value for name, value in counters.items() if value}


def chat_reply(model: str, tokens: list[str], run: Run) -> Reply:
    def message(content: str) -> dict[str, Any]:
        return {
            "model": model,
            "created_at": now_rfc3339(),
            "message": {"role": "assistant", "content": content},
        }

    def final(content: str) -> dict[str, Any]:
        return {**message(content), "done": True, "done_reason": "stop", **run.counters(len(tokens))}

    return Reply(
        content_type=NDJSON,
        items=tokens,
        line=lambda token: ndjson_line({**message(token), "done": False}),
        closing=lambda: [ndjson_line(final(""))],
        error_line=ndjson_line({"error": MODEL_ERROR_MESSAGE}),
        whole=lambda: final("".join(tokens)),
    )


def generate_reply(model: str, tokens: list[str], run: Run) -> Reply:
    def response(text: str) -> dict[str, Any]:
        return {"model": model, "created_at": now_rfc3339(), "response": text}

    def final(text: str) -> dict[str, Any]:
        counters = run.counters(len(tokens))
        return {**response(text), "done": True, "done_reason": "stop", "context": [1, 2, 3], **counters}

    return Reply(
        content_type=NDJSON,
        items=tokens,
        line=lambda token: ndjson_line({**response(token), "done": False}),
        closing=lambda: [ndjson_line(final(""))],
        error_line=ndjson_line({"error": MODEL_ERROR_MESSAGE}),
        whole=lambda: final("".join(tokens)),
    )


def _asks_usage(body: dict[str, Any]) -> bool:
    stream_options = body.get("stream_options")
    return isinstance(stream_options, dict) and bool(stream_options.get("include_usage"))


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


def openai_completion_reply(model: str, tokens: list[str], prompt_tokens: int, include_usage: bool) -> Reply:
    head = {"id": f"cmpl-{random.randrange(999)}", "model": model, "system_fingerprint": "fp_ollama"}
    usage = openai_usage(prompt_tokens, len(tokens))

    def completion(text: str, finish_reason: str | None) -> dict[str, Any]:
        choice = {"text": text, "index": 0, "finish_reason": finish_reason}
        return {**head, "object": "text_completion", "created": int(time.time()), "choices": [choice]}

    return Reply(
        content_type=EVENT_STREAM,
        items=tokens,
        line=lambda token: sse_event(completion(token, None)),
        closing=lambda: [
            sse_event(completion("", "stop")),
            *([sse_event({**completion("", None), "choices": [], "usage": usage})] if include_usage else []),
            b"data: [DONE]\n\n",
        ],
        error_line=sse_event(openai_error(500, MODEL_ERROR_MESSAGE)),
        whole=lambda: {
            **completion("".join(tokens), "stop"),
            "usage": usage,
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
OPENAI_COMPLETION_REQUEST = GoStruct(
    "openai.CompletionRequest", {"model": STRING, "prompt": ANY, "stream_options": ANY, **_KNOBS}
)
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


@dataclass(frozen=True)
class ModelStats:
    """One model's scheduling state on one fake Ollama, as a snapshot."""

    loaded: bool
    loading: bool
    loads: int  # loads completed since the instance started or was reset (the default models start loaded)
    in_flight: int  # requests holding a slot
    queued: int  # requests waiting for a slot
    max_in_flight: int  # the most requests ever seen holding a slot at once
    max_sent: int  # the most ever holding or waiting for a slot at once: what clients sent it at once


@dataclass(eq=False)
class ModelRunner:
    """One model's runner: whether it is loaded, and its slots with the FIFO of requests waiting for one."""

    loaded: bool = False
    loading: "asyncio.Task[None] | None" = None
    loads: int = 0
    # Requests anywhere in the scheduler for this model, from asking for the runner to their end (Ollama's
    # refCount): a runner is idle, and may be unloaded to make room, only when there are none.
    users: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    max_sent: int = 0
    waiters: deque["asyncio.Future[None]"] = field(default_factory=deque)
    last_used: float = 0.0  # time.monotonic(), for the least-recently-used choice
    idle_since: float = field(default_factory=time.time)  # wall clock, for /api/ps's expires_at

    def stats(self) -> ModelStats:
        return ModelStats(
            loaded=self.loaded,
            loading=self.loading is not None,
            loads=self.loads,
            in_flight=self.in_flight,
            queued=len(self.waiters),
            max_in_flight=self.max_in_flight,
            max_sent=self.max_sent,
        )


class Scheduler:
    """Ollama's scheduler for one fake instance: model loads (server/sched.go) and each runner's slots
    (llm/llama_server.go, a FIFO semaphore of OLLAMA_NUM_PARALLEL).

    Everything changes on the fake's event loop, always under `changed`, which is notified at every change:
    the test's thread reads consistent snapshots and can wait for a state (`FakeOllama.wait_until`). Limits
    are passed in by the caller at each step, so a test may change its fake's settings between requests.
    """

    def __init__(self, loaded: Iterable[str], load_tasks: "set[asyncio.Task[None]]") -> None:
        # Reentrant, so a predicate given to `wait_until` may take snapshots itself.
        self.changed = threading.Condition(threading.RLock())
        self._runners: dict[str, ModelRunner] = {name: ModelRunner(loaded=True) for name in loaded}
        self._load_tasks = load_tasks  # the instance's, so stopping it can cancel loads under way
        self._went_idle: asyncio.Event | None = None

    # -- read from any thread ------------------------------------------------------------------------------

    def stats(self, name: str) -> ModelStats:
        with self.changed:
            runner = self._runners.get(name)
            return (runner or ModelRunner()).stats()

    def loaded(self) -> dict[str, float]:
        """The loaded models, each with when it last went idle (wall clock)."""
        with self.changed:
            return {name: runner.idle_since for name, runner in self._runners.items() if runner.loaded}

    def unload(self, names: Iterable[str] | None = None) -> None:
        """Mark models unloaded (all of them when `names` is None), as if their keep-alive had expired: the
        next request loads them again. Requests already running finish undisturbed, a load under way still
        completes, and a load waiting for room under `max_loaded_models` only looks again when a model goes
        idle or a load ends."""
        wanted = None if names is None else set(names)
        with self.changed:
            for name, runner in self._runners.items():
                if wanted is None or name in wanted:
                    runner.loaded = False
            self.changed.notify_all()

    # -- on the event loop ---------------------------------------------------------------------------------

    async def enter(self, name: str, load_seconds: float, max_loaded: int | None) -> ModelRunner:
        """Count a request as a user of the model's runner and return the runner once it is loaded; every
        request arriving during a load waits for that same load. Each call must be paired with `leave`."""
        with self.changed:
            runner = self._runners.setdefault(name, ModelRunner())
            runner.users += 1
            runner.last_used = time.monotonic()
            self.changed.notify_all()
        try:
            while True:
                with self.changed:
                    if runner.loaded:
                        return runner
                    if runner.loading is None:
                        runner.loading = asyncio.ensure_future(self._load(runner, load_seconds, max_loaded))
                        self._load_tasks.add(runner.loading)
                        runner.loading.add_done_callback(self._load_tasks.discard)
                        self.changed.notify_all()
                    loading = runner.loading
                # Shielded: a client that goes away stops waiting, but not the load the others wait for.
                await asyncio.shield(loading)
        except BaseException:
            self.leave(runner)
            raise

    def leave(self, runner: ModelRunner) -> None:
        with self.changed:
            runner.users -= 1
            runner.last_used = time.monotonic()
            if runner.users == 0:
                runner.idle_since = time.time()
                self._wake_loaders()
            self.changed.notify_all()

    async def acquire(self, runner: ModelRunner, slots: int | None) -> None:
        """Take one of the runner's `slots` (None: unlimited), after every request that asked before."""
        with self.changed:
            if not runner.waiters and (slots is None or runner.in_flight < slots):
                self._occupy(runner)
                return
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            runner.waiters.append(waiter)
            runner.max_sent = max(runner.max_sent, runner.in_flight + len(runner.waiters))
            self.changed.notify_all()
        try:
            await waiter
        except asyncio.CancelledError:
            with self.changed:
                granted = waiter.done() and not waiter.cancelled()
                if waiter in runner.waiters:  # `release` may have dropped it already, as cancelled
                    runner.waiters.remove(waiter)
                    self.changed.notify_all()
            if granted:
                # The slot was handed over just as the client went: pass it on.
                self.release(runner, slots)
            raise

    def release(self, runner: ModelRunner, slots: int | None) -> None:
        """Give a slot back; the longest waiter, if any, gets it."""
        with self.changed:
            runner.in_flight -= 1
            while runner.waiters and (slots is None or runner.in_flight < slots):
                waiter = runner.waiters.popleft()
                if not waiter.done():
                    waiter.set_result(None)
                    self._occupy(runner)
            self.changed.notify_all()

    def _wake_loaders(self) -> None:
        """Let loads waiting for room look again: a model went idle, or a load ended."""
        if self._went_idle is not None:
            self._went_idle.set()
            self._went_idle = None

    @staticmethod
    def _occupy(runner: ModelRunner) -> None:
        runner.in_flight += 1
        runner.max_in_flight = max(runner.max_in_flight, runner.in_flight)
        runner.max_sent = max(runner.max_sent, runner.in_flight + len(runner.waiters))

    async def _load(self, runner: ModelRunner, seconds: float, max_loaded: int | None) -> None:
        try:
            await self._make_room(runner, max_loaded)
            await asyncio.sleep(seconds)
            with self.changed:
                runner.loaded = True
                runner.loads += 1
        finally:
            with self.changed:
                runner.loading = None
                self._wake_loaders()
                self.changed.notify_all()

    async def _make_room(self, runner: ModelRunner, max_loaded: int | None) -> None:
        """Unload the least recently used idle models until `runner` fits, waiting for one to go idle if
        none is; as Ollama, a load never interrupts requests running on another model."""
        if max_loaded is None:
            return
        while True:
            with self.changed:
                others = [other for other in self._runners.values() if other is not runner]
                resident = [other for other in others if other.loaded or other.loading is not None]
                if len(resident) < max_loaded:
                    return
                idle = [other for other in resident if other.users == 0 and other.loading is None]
                if idle:
                    min(idle, key=lambda other: other.last_used).loaded = False
                    self.changed.notify_all()
                    continue
                if self._went_idle is None:
                    self._went_idle = asyncio.Event()
                went_idle = self._went_idle
            await went_idle.wait()


class FakeOllama:
    """A fake Ollama on 127.0.0.1:<free port>, served from a background thread.

    Use `start()`/`stop()` (or `with FakeOllama() as fake:`), point the gateway at `url`, then inspect
    `requests` and `streams`. `reset()` between tests restores the defaults.

    The scheduling settings (see the module's docstring) are the keyword arguments, kept as attributes of the
    same names that a test may change while the fake runs; `reset()` restores the values given here.
    `model_parallel` maps a model's full name (as /api/tags lists it) to its own slot count.
    """

    def __init__(
        self,
        *,
        num_parallel: int | None = None,
        model_parallel: dict[str, int] | None = None,
        load_seconds: float = 0.0,
        max_loaded_models: int | None = None,
        prompt_eval_per_token: float = 0.0,
    ) -> None:
        self._scheduling: dict[str, Any] = {
            "num_parallel": num_parallel,
            "model_parallel": dict(model_parallel or {}),
            "load_seconds": load_seconds,
            "max_loaded_models": max_loaded_models,
            "prompt_eval_per_token": prompt_eval_per_token,
        }
        self.num_parallel = num_parallel
        self.model_parallel = dict(model_parallel or {})
        self.load_seconds = load_seconds
        self.max_loaded_models = max_loaded_models
        self.prompt_eval_per_token = prompt_eval_per_token
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
        # Touched on the server's loop only.
        self._load_tasks: set[asyncio.Task[None]] = set()
        self._scheduler = Scheduler((entry["name"] for entry in self.models), self._load_tasks)

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
        """Forget what was recorded and restore the default models (loaded), version, blobs, busy flag and
        scheduling settings. Requests still running from before keep their slots on a scheduler of their own,
        so they hold no later request back and count in no later `model_stats`."""
        with self._lock:
            self.requests.clear()
            self.streams.clear()
        self.models = default_models()
        for name, value in self._scheduling.items():
            setattr(self, name, copy.copy(value))
        self._scheduler = Scheduler((entry["name"] for entry in self.models), self._load_tasks)
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

    # -- scheduling, read and steered from the test's thread -------------------------------------------------

    def model_stats(self, name: str) -> ModelStats:
        """`name`'s loads, slots and queue (a name without a tag means `:latest`)."""
        return self._scheduler.stats(self._model_key(name))

    def unload(self, name: str) -> None:
        """Unload one model, as if its keep-alive had expired (requests running on it finish first)."""
        self._scheduler.unload([self._model_key(name)])

    def unload_all(self) -> None:
        """Unload every model, so that a test starts cold."""
        self._scheduler.unload()

    def wait_until(self, condition: Callable[[], bool], timeout: float) -> None:
        """Block until `condition()` holds, checked at each change of the scheduler's state (and every few
        ms, for conditions on anything else): `wait_until(lambda: fake.model_stats(m).queued == 2, 1.0)`."""
        deadline = time.monotonic() + timeout
        changed = self._scheduler.changed
        with changed:
            while not condition():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the fake Ollama never reached the awaited state")
                changed.wait(min(remaining, 0.01))

    def _model_key(self, name: str) -> str:
        """The scheduler's key for a model: its full name, as Ollama resolves a name without a tag."""
        entry = self._find_model(name)
        if entry is not None:
            return str(entry["name"])
        return name if ":" in name else f"{name}:latest"

    def _slots_of(self, model: str) -> int | None:
        return self.model_parallel.get(model, self.num_parallel)

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
            for task in list(self._load_tasks):
                task.cancel()
            await asyncio.gather(*self._load_tasks, return_exceptions=True)

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

    def _model_run(self, model: str, prompt_tokens: int, started: float) -> Run:
        return Run(model=self._model_key(model), prompt_tokens=prompt_tokens, started=started)

    @contextlib.asynccontextmanager
    async def _turn(self, request: web.Request, knobs: Knobs, run: Run | None) -> AsyncIterator[None]:
        """Hold a request back as Ollama does before its first byte, and keep its slot for the block.

        A model run waits for its model's runner (loading it if need be), then its `fake_load`, then its turn
        for one of the runner's slots, then its prompt's evaluation. Anything else (pull, push, create) only
        waits its `fake_load`. The slot is given back however the block ends, cancellation included.
        """
        if run is None:
            if knobs.load > 0:
                await asyncio.sleep(knobs.load)
            yield
            return
        scheduler = self._scheduler  # the one the request began with, even if the test resets the fake
        runner = await scheduler.enter(run.model, self.load_seconds, self.max_loaded_models)
        try:
            if knobs.load > 0:
                await asyncio.sleep(knobs.load)
            run.loaded_at = time.monotonic()
            await scheduler.acquire(runner, self._slots_of(run.model))
            try:
                run.slot_at = time.monotonic()
                recorded = request.get(RECORDED)
                if recorded is not None:
                    recorded.slot_at, recorded.slot_wait = run.slot_at, run.slot_at - run.loaded_at
                if self.prompt_eval_per_token > 0:
                    await asyncio.sleep(self.prompt_eval_per_token * run.prompt_tokens)
                run.prompt_done_at = time.monotonic()
                yield
            finally:
                scheduler.release(runner, self._slots_of(run.model))
        finally:
            scheduler.leave(runner)

    async def _answer(
        self,
        request: web.Request,
        model: str,
        knobs: Knobs,
        streaming: bool,
        reply: Reply,
        run: Run | None,
    ) -> web.StreamResponse:
        if knobs.garbage:
            return garbage_response()
        if streaming:
            return await self._stream(request, model, knobs, reply, run)
        return await self._whole(request, knobs, reply, run)

    async def _stream(
        self, request: web.Request, model: str, knobs: Knobs, reply: Reply, run: Run | None
    ) -> web.StreamResponse:
        record = StreamRecord(path=request.path, model=model, started_at=time.monotonic())
        with self._stream_added:
            self.streams.append(record)
            self._stream_added.notify_all()
        response = web.StreamResponse(headers={"Content-Type": reply.content_type})
        try:
            # Ollama sends nothing, not even headers, until the request runs and its prompt is evaluated.
            async with self._turn(request, knobs, run):
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

    async def _whole(
        self, request: web.Request, knobs: Knobs, reply: Reply, run: Run | None
    ) -> web.StreamResponse:
        """The answer to `"stream": false`: the same work and faults, delivered as one object."""
        fault_at = knobs.fault_index(len(reply.items))
        produced = len(reply.items) if fault_at is None else fault_at
        async with self._turn(request, knobs, run):
            await asyncio.sleep(knobs.interval * produced)
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
        """The loaded models, the one expiring last first, as Ollama lists them; a model being loaded is not
        listed yet (Ollama's /api/ps blocks until the load ends)."""
        loaded = self._scheduler.loaded()
        running = [
            {
                **{key: entry[key] for key in ("name", "model", "size", "digest", "details") if key in entry},
                "expires_at": datetime.fromtimestamp(loaded[entry["name"]], UTC) + KEEP_ALIVE,
                "size_vram": entry.get("size", 0),
                "context_length": CONTEXT_LENGTH,
            }
            for entry in self.models
            if entry.get("name") in loaded
        ]
        running.sort(key=lambda model: model["expires_at"], reverse=True)
        for model in running:
            model["expires_at"] = model["expires_at"].isoformat()
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
        run = self._model_run(model, 0 if knobs.cached_prompt else count_prompt_tokens(prompt), started)
        reply = chat_reply(model, knobs.content(last), run)
        return await self._answer(request, model, knobs, body.get("stream") is not False, reply, run)

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        started, body, model, knobs = await self._model_request(request, GENERATE_REQUEST)
        prompt = str(body.get("prompt") or "")
        run = self._model_run(model, count_prompt_tokens(prompt), started)
        reply = generate_reply(model, knobs.content(prompt), run)
        return await self._answer(request, model, knobs, body.get("stream") is not False, reply, run)

    async def _embed(self, request: web.Request) -> web.Response:
        started, body, model, knobs = await self._model_request(request, EMBED_REQUEST)
        inputs = embedding_inputs(body.get("input"))
        run = self._model_run(model, sum(count_prompt_tokens(text) for text in inputs), started)
        async with self._turn(request, knobs, run):
            counters = run.counters(0)
        return json_response(
            {
                "model": model,
                "embeddings": [fake_embedding(text) for text in inputs],
                "total_duration": counters["total_duration"],
                "load_duration": counters["load_duration"],
                "prompt_eval_count": counters.get("prompt_eval_count", 0),
            }
        )

    async def _embeddings(self, request: web.Request) -> web.Response:
        started, body, model, knobs = await self._model_request(request, EMBEDDING_REQUEST)
        prompt = str(body.get("prompt") or "")
        async with self._turn(request, knobs, self._model_run(model, count_prompt_tokens(prompt), started)):
            return json_response({"embedding": fake_embedding(prompt) if prompt else []})

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
        return await self._answer(request, name, self._knobs(body), streaming, reply, None)

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
        started, body, model, knobs = await self._model_request(request, OPENAI_CHAT_REQUEST)
        messages = [message for message in body.get("messages") or [] if isinstance(message, dict)]
        last = text_of(messages[-1].get("content")) if messages else ""
        prompt = " ".join(text_of(message.get("content")) for message in messages)
        include_usage = _asks_usage(body)
        run = self._model_run(model, count_prompt_tokens(prompt), started)
        reply = openai_chat_reply(model, knobs.content(last), run.prompt_tokens, include_usage)
        return await self._answer(request, model, knobs, body.get("stream") is True, reply, run)

    async def _openai_completions(self, request: web.Request) -> web.StreamResponse:
        started, body, model, knobs = await self._model_request(request, OPENAI_COMPLETION_REQUEST)
        prompt = str(body.get("prompt") or "")
        run = self._model_run(model, count_prompt_tokens(prompt), started)
        reply = openai_completion_reply(model, knobs.content(prompt), run.prompt_tokens, _asks_usage(body))
        return await self._answer(request, model, knobs, body.get("stream") is True, reply, run)

    async def _openai_responses(self, request: web.Request) -> web.StreamResponse:
        started, body, model, knobs = await self._model_request(request, OPENAI_RESPONSES_REQUEST)
        given = body.get("input")
        if isinstance(given, list) and given:
            last = given[-1]
            given = text_of(last.get("content")) if isinstance(last, dict) else str(last)
        text = given if isinstance(given, str) else ""
        run = self._model_run(model, count_prompt_tokens(text), started)
        reply = responses_reply(model, knobs.content(text), run.prompt_tokens)
        return await self._answer(request, model, knobs, body.get("stream") is True, reply, run)

    async def _openai_embeddings(self, request: web.Request) -> web.Response:
        started, body, model, knobs = await self._model_request(request, OPENAI_EMBED_REQUEST)
        inputs = embedding_inputs(body.get("input"))
        tokens = sum(count_prompt_tokens(text) for text in inputs)
        async with self._turn(request, knobs, self._model_run(model, tokens, started)):
            data = [
                {"object": "embedding", "embedding": fake_embedding(text), "index": index}
                for index, text in enumerate(inputs)
            ]
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
