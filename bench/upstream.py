"""A fake Ollama server that costs as little CPU as possible.

The bench measures what a relay adds, and the upstream shares two cores with the relay and the load client,
so it is raw asyncio protocols on uvloop with pre-encoded bytes: no framework, no timer per stream. Streams
are paced like batched GPU decoding: one shared ticker per distinct interval writes the next line to every
active stream on each tick.

`POST /api/chat` streams chat chunks, one JSON line per HTTP chunk. The request's `options` may carry
`bench_tokens` (default 100), `bench_interval` in seconds (default 0.02; 0 writes the whole stream at once)
and `bench_id`, a label under which the request's slot and a stream cut short by its peer are recorded. The
first token goes out with the headers, the rest on the ticks, then the final `done` line: bench_tokens + 1
lines in all.
`POST /api/embed` answers at once with one small embedding, whatever the body: a short request.
`GET /api/tags` and `GET /api/ps` list one model, `bench:latest`, always loaded.

Slots (`--parallel N`), as Ollama schedules a loaded model (notes: ollama-scheduling): each model (the body's
`model`) runs at most N chats at once; the others wait, unseen and without limit, in a FIFO, and nothing is
sent to them, not even headers, before their slot. A client that hangs up while waiting leaves the FIFO.
Without `--parallel` every chat runs at once, as the bench's relay scenarios want.
Either way the final line's counters are measured, phase by phase, in nanoseconds: `load_duration` is 0 (the
model is always loaded), then the wait for a slot, `prompt_eval_duration` (slot to first token) and
`eval_duration` (first token to the final line), so `total_duration - load_duration - prompt_eval_duration -
eval_duration` is exactly the time the request waited for its slot.

Control endpoints for the orchestrator:
  GET  /_bench/stats        {"open_connections": n (not counting the asking one), "active_streams": n
                            (running or waiting for a slot), "waiting": n, "served": chats given a slot}
  GET  /_bench/disconnects  {"disconnects": [{"id": bench_id, "t": time.monotonic() at connection_lost}]}
  GET  /_bench/slots        {"parallel": N or null, "requests": [{"id": bench_id, "arrived", "slot", "end"}]}:
                            per chat with a bench_id, when it arrived, got its slot (null: never) and ended
                            (finished, or its connection lost), in time.monotonic() seconds
  POST /_bench/reset        forgets the recorded disconnects and slots, and the count served

Run as `python -m bench.upstream [--parallel N]`: prints {"port": N} once listening; exits when its stdin
closes.
"""

import argparse
import asyncio
import contextlib
import json
import time
from collections import deque
from typing import cast

import uvloop

from bench.procs import HOST, raise_fd_limit, stdin_closed

TOKEN_LINE = (
    b'{"model":"bench","created_at":"2026-01-01T00:00:00.000000Z",'
    b'"message":{"role":"assistant","content":"tok "},"done":false}\n'
)
DONE_LINE = (
    b'{"model":"bench","created_at":"2026-01-01T00:00:00.000000Z",'
    b'"message":{"role":"assistant","content":""},"done":true,"done_reason":"stop",'
    b'"total_duration":%d,"load_duration":%d,"prompt_eval_count":1,"prompt_eval_duration":%d,'
    b'"eval_count":%d,"eval_duration":%d}\n'
)
MODEL = {
    "name": "bench:latest",
    "model": "bench:latest",
    "size": 1,
    "digest": "0" * 64,
    "details": {"family": "bench", "parameter_size": "1B", "quantization_level": "Q4_0"},
}
TAGS = {"models": [{**MODEL, "modified_at": "2026-01-01T00:00:00.000000Z"}]}
# The gateway's periodic check of a host reads /api/ps as well as /api/tags.
PS = {
    "models": [{**MODEL, "expires_at": "2099-01-01T00:00:00.000000Z", "size_vram": 1, "context_length": 4096}]
}
MAX_HEAD = 65536
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 431: b"Request Header Fields Too Large"}
JSON_TYPE = b"application/json; charset=utf-8"
EMBEDDING = json.dumps(
    {
        "model": "bench",
        "embeddings": [[0.01 * n for n in range(16)]],
        "total_duration": 1,
        "prompt_eval_count": 2,
    }
).encode()


def http_chunk(payload: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(payload), payload)


TOKEN_CHUNK = http_chunk(TOKEN_LINE)
END_OF_BODY = b"0\r\n\r\n"
STREAM_HEAD = {
    keep_alive: b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n"
    + (b"" if keep_alive else b"Connection: close\r\n")
    + b"\r\n"
    for keep_alive in (True, False)
}


def plain_response(status: int, body: bytes, keep_alive: bool, content_type: bytes, head_only: bool) -> bytes:
    head = b"HTTP/1.1 %d %b\r\nContent-Type: %b\r\nContent-Length: %d\r\n%b\r\n" % (
        status,
        REASONS[status],
        content_type,
        len(body),
        b"" if keep_alive else b"Connection: close\r\n",
    )
    return head if head_only else head + body


class BadRequest(Exception):
    def __init__(self, status: int):
        self.status = status


class Request:
    __slots__ = ("body", "keep_alive", "method", "path")

    def __init__(self, method: str, path: str, keep_alive: bool, body: bytes):
        self.method, self.path, self.keep_alive, self.body = method, path, keep_alive, body


def parse_request(buffer: bytearray) -> tuple[Request, int] | None:
    """The first complete request in the buffer and the bytes it took, or None while it is incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise BadRequest(431)
        return None
    lines = buffer[:end].decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ")
    except ValueError:
        raise BadRequest(400) from None
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip().lower()
    connection = headers.get("connection", "")
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    start = end + 4
    if "chunked" in headers.get("transfer-encoding", ""):
        decoded = decode_chunked(buffer, start)
        if decoded is None:
            return None
        body, consumed = decoded
    else:
        try:
            consumed = start + int(headers.get("content-length", "0"))
        except ValueError:
            raise BadRequest(400) from None
        if len(buffer) < consumed:
            return None
        body = bytes(buffer[start:consumed])
    return Request(method, target.partition("?")[0], keep_alive, body), consumed


def decode_chunked(buffer: bytearray, pos: int) -> tuple[bytes, int] | None:
    """A chunked request body (a relay may stream the body it forwards) and where it ends, or None."""
    body = bytearray()
    while True:
        eol = buffer.find(b"\r\n", pos)
        if eol < 0:
            return None
        try:
            size = int(buffer[pos:eol].split(b";")[0], 16)
        except ValueError:
            raise BadRequest(400) from None
        pos = eol + 2
        if size == 0:
            if buffer[pos : pos + 2] == b"\r\n":
                return bytes(body), pos + 2
            trailers_end = buffer.find(b"\r\n\r\n", pos)
            return None if trailers_end < 0 else (bytes(body), trailers_end + 4)
        if len(buffer) < pos + size + 2:
            return None
        body += buffer[pos : pos + size]
        pos += size + 2


class Slots:
    """One model's slots: how many are free, and the chats waiting for one, first come first served."""

    __slots__ = ("admitting", "free", "waiting")

    def __init__(self, count: int):
        self.free = count
        self.waiting: deque[Stream] = deque()
        self.admitting = False


class Stream:
    """A chat, from its arrival (waiting for a slot, then running) to its end; its ticker calls advance()
    once per tick. Times are time.monotonic_ns(): the final line's counters are their differences."""

    __slots__ = (
        "arrived",
        "bench_id",
        "conn",
        "eval_count",
        "first_at",
        "interval",
        "left",
        "slot_at",
        "slots",
    )

    def __init__(self, conn: "Connection", tokens: int, interval: float, bench_id: object):
        self.conn, self.left, self.eval_count, self.bench_id = conn, tokens, tokens, bench_id
        self.interval = interval
        self.arrived = time.monotonic_ns()
        self.slot_at = 0
        self.first_at = 0
        self.slots: Slots | None = None  # the model's slots, while it holds one of them

    def advance(self) -> bool:
        """Writes the next line; False once the stream is over, finished or cut."""
        conn = self.conn
        if conn.closed:
            return False
        if self.left:
            self.left -= 1
            conn.transport.write(TOKEN_CHUNK)
            return True
        self.finish()
        return False

    def finish(self, lines: bytes = b"") -> None:
        """Writes `lines` (what is left of the stream) and the final line with its counters."""
        now = time.monotonic_ns()
        counters = (
            now - self.arrived,
            0,
            self.first_at - self.slot_at,
            self.eval_count,
            now - self.first_at,
        )
        self.conn.transport.write(lines + http_chunk(DONE_LINE % counters) + END_OF_BODY)
        self.conn.stream_finished(now)


class Ticker:
    """Writes the next line of every stream of one interval on one shared clock, like a decoding batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop, interval: float):
        self._loop = loop
        self._interval = interval
        self._streams: set[Stream] = set()
        self._next = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def add(self, stream: Stream) -> None:
        self._streams.add(stream)
        if self._timer is None:
            self._next = self._loop.time() + self._interval
            self._timer = self._loop.call_at(self._next, self._tick)

    def _tick(self) -> None:
        # Iterate over a copy: streams end during the tick, and a kept-alive connection may start its next.
        for stream in list(self._streams):
            if not stream.advance():
                self._streams.discard(stream)
        if not self._streams:
            self._timer = None
            return
        # Keep the cadence, but after a stall resume from now rather than bursting the missed ticks.
        self._next = max(self._next + self._interval, self._loop.time())
        self._timer = self._loop.call_at(self._next, self._tick)


class FakeOllama:
    """State shared by all connections: routes, slots, tickers and what the bench asks about."""

    def __init__(self, loop: asyncio.AbstractEventLoop, parallel: int | None):
        self.loop = loop
        self.parallel = parallel
        self.connections: set[Connection] = set()
        self.active_streams = 0
        self.served = 0
        self.disconnects: list[dict] = []
        self.slot_log: list[dict] = []
        self._slots: dict[str, Slots] = {}
        self._tickers: dict[float, Ticker] = {}
        self._static = {
            "/": (b"text/plain; charset=utf-8", b"Ollama is running"),
            "/api/version": (JSON_TYPE, b'{"version":"0.12.3"}'),
            "/api/tags": (JSON_TYPE, json.dumps(TAGS).encode()),
            "/api/ps": (JSON_TYPE, json.dumps(PS).encode()),
        }
        self._posted = {"/api/embed": EMBEDDING}

    def dispatch(self, conn: "Connection", request: Request) -> None:
        method, path = request.method, request.path
        if method == "POST" and path == "/api/chat":
            self.chat(conn, request.body)
        elif method == "POST" and path in self._posted:
            conn.reply(200, self._posted[path])
        elif method in ("GET", "HEAD") and path in self._static:
            content_type, body = self._static[path]
            conn.reply(200, body, content_type, head_only=method == "HEAD")
        elif method == "GET" and path == "/_bench/stats":
            stats = {
                "open_connections": len(self.connections) - 1,
                "active_streams": self.active_streams,
                "waiting": sum(
                    not stream.conn.closed for slots in self._slots.values() for stream in slots.waiting
                ),
                "served": self.served,
            }
            conn.reply(200, json.dumps(stats).encode())
        elif method == "GET" and path == "/_bench/disconnects":
            conn.reply(200, json.dumps({"disconnects": self.disconnects}).encode())
        elif method == "GET" and path == "/_bench/slots":
            conn.reply(200, json.dumps({"parallel": self.parallel, "requests": self.slot_log}).encode())
        elif method == "POST" and path == "/_bench/reset":
            self.disconnects.clear()
            self.slot_log.clear()
            self.served = 0
            conn.reply(200, b"{}")
        else:
            conn.reply(404, b'{"error":"not found"}')

    def chat(self, conn: "Connection", body: bytes) -> None:
        try:
            fields = json.loads(body)
            options = fields.get("options") or {}
            tokens = int(options.get("bench_tokens", 100))
            interval = float(options.get("bench_interval", 0.02))
            model = str(fields.get("model"))
        except (ValueError, AttributeError, TypeError):
            conn.reply(400, b'{"error":"invalid chat request"}')
            return
        stream = Stream(conn, tokens, interval, options.get("bench_id"))
        conn.stream = stream
        self.active_streams += 1
        if self.parallel is None:
            self._run(stream)
            return
        slots = self._slots.get(model)
        if slots is None:
            slots = self._slots[model] = Slots(self.parallel)
        if slots.free and not slots.waiting:
            slots.free -= 1
            stream.slots = slots
            self._run(stream)
        else:
            slots.waiting.append(stream)

    def _run(self, stream: Stream) -> None:
        """The chat has its slot: the headers and the first token now, the rest on its ticker's ticks."""
        self.served += 1
        conn = stream.conn
        stream.slot_at = time.monotonic_ns()
        head = STREAM_HEAD[conn.keep_alive]
        if stream.left:
            stream.left -= 1
            head += TOKEN_CHUNK
        stream.first_at = time.monotonic_ns()
        if stream.interval <= 0:
            lines, stream.left = head + TOKEN_CHUNK * stream.left, 0
            stream.finish(lines)
            return
        conn.transport.write(head)
        ticker = self._tickers.get(stream.interval)
        if ticker is None:
            ticker = self._tickers[stream.interval] = Ticker(self.loop, stream.interval)
        ticker.add(stream)

    def stream_ended(self, stream: Stream, now: int) -> None:
        """A chat finished, or its client went (running or waiting): its slot, if it held one, goes to the
        first chat still waiting for the model."""
        if stream.bench_id is not None:
            self.slot_log.append(
                {
                    "id": stream.bench_id,
                    "arrived": stream.arrived / 1e9,
                    "slot": stream.slot_at / 1e9 if stream.slot_at else None,
                    "end": now / 1e9,
                }
            )
        slots = stream.slots
        if slots is None:
            return  # it held no slot: a chat cut while waiting is skipped when its turn comes
        stream.slots = None
        slots.free += 1
        if slots.admitting:
            return  # a chat that ran to its end at once (interval 0) inside the loop below
        slots.admitting = True
        try:
            while slots.free and slots.waiting:
                waiting = slots.waiting.popleft()
                if waiting.conn.closed:
                    continue
                slots.free -= 1
                waiting.slots = slots
                self._run(waiting)
        finally:
            slots.admitting = False


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: requests one after another, kept alive unless the client says otherwise."""

    # Set by connection_made, which asyncio calls before any other method of a protocol.
    transport: asyncio.Transport

    def __init__(self, server: FakeOllama):
        self.server = server
        self.buffer = bytearray()
        self.stream: Stream | None = None
        self.keep_alive = True
        self.closed = False
        self.serving = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # What create_server hands a protocol is a Transport, though BaseProtocol's signature says less.
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.stream is None:
            self.serve()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        stream = self.stream
        if stream is not None:
            self.server.disconnects.append({"id": stream.bench_id, "t": time.monotonic()})
            self.server.active_streams -= 1
            self.stream = None
            self.server.stream_ended(stream, time.monotonic_ns())

    def serve(self) -> None:
        """Answers the buffered requests until one starts a stream, which holds the connection until done."""
        self.serving = True
        try:
            self._serve()
        finally:
            self.serving = False

    def _serve(self) -> None:
        while self.stream is None and not self.closed:
            try:
                parsed = parse_request(self.buffer)
            except BadRequest as error:
                self.keep_alive = False
                self.reply(error.status, b'{"error":"bad request"}')
                self.transport.close()
                return
            if parsed is None:
                return
            request, consumed = parsed
            del self.buffer[:consumed]
            self.keep_alive = request.keep_alive
            self.server.dispatch(self, request)
            if not self.keep_alive:
                if self.stream is None:
                    self.transport.close()
                return

    def reply(
        self, status: int, body: bytes, content_type: bytes = JSON_TYPE, head_only: bool = False
    ) -> None:
        self.transport.write(plain_response(status, body, self.keep_alive, content_type, head_only))

    def stream_finished(self, now: int) -> None:
        stream = self.stream
        self.stream = None
        self.server.active_streams -= 1
        if stream is not None:
            self.server.stream_ended(stream, now)
        if not self.keep_alive:
            self.transport.close()
        elif not self.serving:  # else the loop in serve() goes on to the next request itself
            self.serve()


async def serve(parallel: int | None) -> None:
    loop = asyncio.get_running_loop()
    fake = FakeOllama(loop, parallel)
    server = await loop.create_server(lambda: Connection(fake), HOST, 0, backlog=4096)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await stdin_closed()
    server.close()


def positive(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError("at least 1")
    return number


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parallel",
        type=positive,
        help="slots per model (Ollama's OLLAMA_NUM_PARALLEL), the rest waiting in a FIFO; unset: no limit",
    )
    args = parser.parse_args()
    raise_fd_limit()
    # Ctrl-C reaches the whole process group: the orchestrator reports it, this process just ends.
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args.parallel))
