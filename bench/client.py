"""Load client: NDJSON chat streams, each on a fresh TCP connection, parsed as the bytes arrive.

Raw asyncio protocols on uvloop so that the client is not what limits the measurement. It runs as its own
process and takes jobs from stdin, one JSON object per line, answering each with one JSON line on stdout
(`{"event": "result", ...}`). Every job names its target ({"host", "port", "path", "headers"}) and the
upstream's `options` for its streams:

  concurrent   `count` streams at once; summary of the run
  sequential   `warmup` then `count` streams one after another; summary of the counted ones
  hold         `count` streams at once; prints {"event": "held"} once each has a line, waits for a line
               "release" on stdin, closes them all; summary
  disconnect   `count` streams one after another, each closed after `after_lines` lines; for each
               {"id": its options.bench_id, "t_close": time.monotonic() just before the close}
  short        `connections` kept-alive connections, each sending `request` (a whole HTTP/1.1 request, in
               latin-1) again as soon as the last answer is in, for `warmup` then `seconds` seconds,
               printing {"event": "counting"} and {"event": "counted"} around the counted seconds; the
               count of answers, how many were 200, per second, and their latency
  noisy        two people sharing a model: `burst` streams at once to target `a` (the noisy neighbour),
               and, from `b_start` seconds later, one stream at a time to target `b` (a person chatting:
               send, read the whole answer, pause `b_pause` s, send the next), until every one of a's is
               over (or `bound` seconds passed), or for `b_messages` messages when given. A summary per
               person, and each stream's `bench_id` with the time it was sent

Exchange parses any HTTP/1.1 response, not only streams: bench/traffic.py builds the soak's mixed
traffic on it and serves its own jobs with serve_jobs().

Times are time.monotonic(), which is CLOCK_MONOTONIC and so comparable with the upstream's.
"""

import asyncio
import contextlib
import json
import sys
import time
from typing import cast

import uvloop

from bench.procs import raise_fd_limit
from bench.stats import summarize_ms

TAIL = 1024


def build_request(target: dict, options: dict) -> bytes:
    body = json.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": "Say something."}],
            "stream": True,
            "options": options,
        },
        separators=(",", ":"),
    ).encode()
    # Connection: close, for every target alike: each stream is a connection of its own, as from a browser.
    head = [
        f"POST {target['path']} HTTP/1.1",
        f"Host: {target['host']}:{target['port']}",
        "Content-Type: application/json",
        "Accept: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{name}: {value}" for name, value in target["headers"].items()),
    ]
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


class Exchange(asyncio.Protocol):
    """One request and its response on a connection of its own, with what the bench records about it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, request: bytes, milestone_lines: int):
        self.request = request
        self.t_start = time.monotonic()
        self.t_end: float | None = None
        self.first_byte: float | None = None
        self.arrivals: list[float] = []
        self.status = 0
        self.bytes = 0
        self.lines = 0
        self.error: str | None = None
        self.finished = loop.create_future()
        # Resolved once `milestone_lines` lines have arrived, or when the exchange ends short of them.
        self.milestone = loop.create_future()
        self._milestone_lines = milestone_lines
        self._transport: asyncio.Transport | None = None
        self._head: bytearray | None = bytearray()
        self._mode = ""
        self._left = 0
        self._skip = 0
        self._size_line = bytearray()
        self._last = 0
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # What create_connection hands a protocol is a Transport, though BaseProtocol's signature says less.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self._head is not None:
            self._head += data
            end = self._head.find(b"\r\n\r\n")
            if end < 0:
                return
            data = bytes(self._head[end + 4 :])
            self._parse_head(self._head[:end].decode("latin-1"))
            self._head = None
            if self._mode == "length" and not self._left:
                self._end(now)
                return
        if self._mode == "chunked":
            self._feed_chunked(data, now)
        elif self._mode == "length":
            take = data[: self._left]
            self._left -= len(take)
            self._payload(take, now)
            if not self._left:
                self._end(now)
        else:
            self._payload(data, now)

    def _parse_head(self, head: str) -> None:
        lines = head.split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if "chunked" in headers.get("transfer-encoding", ""):
            self._mode = "chunked"
        elif "content-length" in headers:
            self._mode, self._left = "length", int(headers["content-length"])
        else:
            self._mode = "close"

    def _feed_chunked(self, data: bytes, now: float) -> None:
        pos, size = 0, len(data)
        while pos < size:
            if self._left:
                take = data[pos : pos + self._left]
                pos += len(take)
                self._left -= len(take)
                if not self._left:
                    self._skip = 2  # the CRLF after a chunk's data
                self._payload(take, now)
            elif self._skip:
                skipped = min(self._skip, size - pos)
                pos += skipped
                self._skip -= skipped
            else:
                eol = data.find(b"\n", pos)
                if eol < 0:
                    self._size_line += data[pos:]
                    return
                self._size_line += data[pos:eol]
                pos = eol + 1
                chunk_size = int(self._size_line.split(b";")[0], 16)
                self._size_line.clear()
                if not chunk_size:
                    self._end(now)
                    return
                self._left = chunk_size

    def _payload(self, data: bytes, now: float) -> None:
        if not data:
            return
        if self.first_byte is None:
            self.first_byte = now - self.t_start
        if not self.arrivals or self.arrivals[-1] != now:
            self.arrivals.append(now)
        self.bytes += len(data)
        # Lines end with "}\n"; the pair may be split across reads at any byte.
        self.lines += data.count(b"}\n") + (self._last == 0x7D and data[0] == 0x0A)
        self._last = data[-1]
        self._tail = (self._tail + data)[-TAIL:]
        if self.lines >= self._milestone_lines and not self.milestone.done():
            self.milestone.set_result(None)

    def _end(self, now: float) -> None:
        self.t_end = now
        if self._transport is not None:
            self._transport.close()
        self._settle()

    def _settle(self) -> None:
        for future in (self.milestone, self.finished):
            if not future.done():
                future.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.t_end is None:
            if self._mode == "close" and exc is None:
                self.t_end = time.monotonic()
            elif self.error is None:
                self.error = f"connection lost: {exc or 'closed by peer'}"
        self._settle()

    def fail(self, error: str) -> None:
        self.error = error
        if self._transport is not None:
            self._transport.abort()
        self._settle()

    def close(self) -> None:
        """Hangs up mid-stream, as a user who stops a generation does."""
        self.error = "closed by client"
        if self._transport is not None:
            self._transport.close()
        self._settle()

    def final_line_done(self) -> bool:
        last = self._tail.rstrip(b"\n").rpartition(b"\n")[2]
        try:
            return json.loads(last).get("done") is True
        except (ValueError, AttributeError):
            return False

    def tail(self) -> bytes:
        """The body's last bytes (up to 1 KB): all of a small JSON answer, or a stream's last lines."""
        return self._tail

    def gaps(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.arrivals, self.arrivals[1:], strict=False)]


async def start(target: dict, request: bytes, milestone_lines: int = 1) -> Exchange:
    loop = asyncio.get_running_loop()
    exchange = Exchange(loop, request, milestone_lines)
    try:
        await loop.create_connection(lambda: exchange, target["host"], target["port"])
    except OSError as error:
        exchange.fail(f"connect: {error}")
    return exchange


async def wait_finished(exchanges: list[Exchange], within: float) -> None:
    pending = [exchange.finished for exchange in exchanges if not exchange.finished.done()]
    if pending:
        await asyncio.wait(pending, timeout=within)
    for exchange in exchanges:
        if not exchange.finished.done():
            exchange.fail("timeout")


def summarize(exchanges: list[Exchange], t0: float, expect_lines: int | None) -> dict:
    """What a run did: `ok` streams have status 200, every expected line and a final done line."""
    ok = 0
    problems: dict[str, int] = {}
    for exchange in exchanges:
        if (
            exchange.status == 200
            and exchange.t_end is not None
            and (expect_lines is None or exchange.lines == expect_lines)
            and exchange.final_line_done()
        ):
            ok += 1
        else:
            problem = exchange.error or f"status {exchange.status}, {exchange.lines} lines"
            problems[problem] = problems.get(problem, 0) + 1
    ends = [exchange.t_end for exchange in exchanges if exchange.t_end is not None]
    first_bytes = [exchange.first_byte for exchange in exchanges if exchange.first_byte is not None]
    return {
        "count": len(exchanges),
        "ok": ok,
        # Status 0: no response head at all (refused, reset or timed out before it).
        "non_200": sum(1 for exchange in exchanges if exchange.status != 200),
        "problems": problems,
        "wall_s": round(max(ends) - t0, 4) if ends else None,
        "first_byte_ms": summarize_ms(first_bytes),
        "gap_ms": summarize_ms([gap for exchange in exchanges for gap in exchange.gaps()]),
        "bytes": sum(exchange.bytes for exchange in exchanges),
    }


async def run_concurrent(job: dict) -> dict:
    request = build_request(job["target"], job["options"])
    t0 = time.monotonic()
    exchanges = await asyncio.gather(*(start(job["target"], request) for _ in range(job["count"])))
    await wait_finished(exchanges, job["timeout"])
    return summarize(exchanges, t0, job.get("expect_lines"))


async def run_sequential(job: dict) -> dict:
    request = build_request(job["target"], job["options"])
    for _ in range(job["warmup"]):
        await wait_finished([await start(job["target"], request)], job["timeout"])
    t0 = time.monotonic()
    exchanges = []
    for _ in range(job["count"]):
        exchange = await start(job["target"], request)
        await wait_finished([exchange], job["timeout"])
        exchanges.append(exchange)
    return summarize(exchanges, t0, job.get("expect_lines"))


async def run_hold(job: dict) -> dict:
    loop = asyncio.get_running_loop()
    request = build_request(job["target"], job["options"])
    t0 = time.monotonic()
    exchanges = await asyncio.gather(*(start(job["target"], request) for _ in range(job["count"])))
    await asyncio.wait([exchange.milestone for exchange in exchanges], timeout=job["timeout"])
    held = sum(1 for exchange in exchanges if exchange.lines and not exchange.finished.done())
    emit({"event": "held", "held": held, "after_s": round(time.monotonic() - t0, 3)})
    await loop.run_in_executor(None, sys.stdin.readline)
    for exchange in exchanges:
        if not exchange.finished.done():
            exchange.close()
    result = summarize(exchanges, t0, None)
    result["held"] = held
    return result


async def run_disconnect(job: dict) -> dict:
    cuts: list[dict[str, object]] = []
    for number in range(job["count"]):
        bench_id = f"{job['label']}-{number}"
        request = build_request(job["target"], {**job["options"], "bench_id": bench_id})
        exchange = await start(job["target"], request, milestone_lines=job["after_lines"])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exchange.milestone), job["timeout"])
        if exchange.finished.done():
            cuts.append({"id": bench_id, "error": exchange.error or f"ended after {exchange.lines} lines"})
            continue
        t_close = time.monotonic()
        exchange.close()
        cuts.append({"id": bench_id, "t_close": t_close, "lines": exchange.lines})
        # Let the relay see this hang-up on its own before the next stream starts.
        await asyncio.sleep(job["pause"])
    return {"cuts": cuts}


class _KeptAlive(asyncio.Protocol):
    """One kept-alive connection sending the same short request again and again, each once the previous
    answer is complete (its body framed by Content-Length or chunked)."""

    stopping = False  # set for all at once when the job ends: each closes after its current answer

    def __init__(self, request: bytes, record) -> None:
        self.request = request
        self.record = record
        self.closed = asyncio.get_running_loop().create_future()
        self.buffer = b""
        self.sent_at = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._send()

    def _send(self) -> None:
        if self.stopping:
            self.transport.close()
            return
        self.sent_at = time.monotonic()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = self.buffer[:end].decode("latin-1").lower()
        body = self.buffer[end + 4 :]
        if "transfer-encoding: chunked" in head:
            if not body.endswith(b"0\r\n\r\n"):
                return
        else:
            length = next(
                (
                    int(line.split(":", 1)[1])
                    for line in head.split("\r\n")
                    if line.startswith("content-length:")
                ),
                0,
            )
            if len(body) < length:
                return
        self.buffer = b""
        self.record(int(head[9:12]), time.monotonic() - self.sent_at)
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


async def run_short(job: dict) -> dict:
    loop = asyncio.get_running_loop()
    target = job["target"]
    request = job["request"].encode("latin-1")
    counted = {"on": False, "answers": 0, "ok": 0, "reconnects": 0}
    latencies: list[float] = []
    stopping = False

    def record(status: int, latency: float) -> None:
        if counted["on"]:
            counted["answers"] += 1
            counted["ok"] += status == 200
            latencies.append(latency)

    async def keep_sending() -> None:
        # A server may close a kept-alive connection after so many requests (nginx: 1000): open another.
        while True:
            _, protocol = await loop.create_connection(
                lambda: _KeptAlive(request, record), target["host"], target["port"]
            )
            await protocol.closed
            if stopping:
                return
            counted["reconnects"] += 1

    senders = [asyncio.ensure_future(keep_sending()) for _ in range(job["connections"])]
    await asyncio.sleep(job["warmup"])
    emit({"event": "counting"})
    counted["on"] = True
    t0 = time.monotonic()
    await asyncio.sleep(job["seconds"])
    counted["on"] = False
    elapsed = time.monotonic() - t0
    emit({"event": "counted"})
    stopping = True
    _KeptAlive.stopping = True
    await asyncio.wait(senders, timeout=job["timeout"])
    _KeptAlive.stopping = False
    return {
        "answers": counted["answers"],
        "ok": counted["ok"],
        "reconnects": counted["reconnects"],
        "seconds": round(elapsed, 3),
        "per_s": round(counted["answers"] / elapsed, 1),
        "latency_ms": summarize_ms(latencies),
    }


async def run_noisy(job: dict) -> dict:
    options = job["options"]
    t0 = time.monotonic()

    def request(target: dict, label: str) -> bytes:
        return build_request(target, {**options, "bench_id": label})

    burst = await asyncio.gather(
        *(start(job["a"], request(job["a"], f"a-{number}")) for number in range(job["burst"]))
    )
    burst_over = asyncio.ensure_future(wait_finished(burst, job["bound"] + job["timeout"]))
    chats: list[Exchange] = []
    deadline = t0 + job["bound"]

    def more() -> bool:
        if job["b_messages"] is not None:
            return len(chats) < job["b_messages"]
        return not burst_over.done() and time.monotonic() < deadline

    await asyncio.sleep(job["b_start"])
    while more():
        chat = await start(job["b"], request(job["b"], f"b-{len(chats)}"))
        await wait_finished([chat], job["timeout"])
        chats.append(chat)
        if more():
            await asyncio.sleep(job["b_pause"])
    await burst_over
    expect = options["bench_tokens"] + 1
    sent = [{"id": f"a-{number}", "t": exchange.t_start} for number, exchange in enumerate(burst)]
    sent += [{"id": f"b-{number}", "t": exchange.t_start} for number, exchange in enumerate(chats)]
    return {
        "a": summarize(burst, t0, expect),
        "b": summarize(chats, t0, expect),
        "b_first_bytes_ms": [
            None if chat.first_byte is None else round(1000 * chat.first_byte, 3) for chat in chats
        ],
        "sent": sent,
    }


JOBS = {
    "concurrent": run_concurrent,
    "sequential": run_sequential,
    "hold": run_hold,
    "disconnect": run_disconnect,
    "short": run_short,
    "noisy": run_noisy,
}


def emit(message: dict) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def serve_jobs(jobs: dict = JOBS) -> None:
    """Runs the jobs read from stdin, one at a time, until stdin closes; `jobs`: kind -> runner."""
    loop = asyncio.get_running_loop()
    emit({"event": "ready"})
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        job = json.loads(line)
        emit({"event": "result", **await jobs[job["kind"]](job)})


if __name__ == "__main__":
    raise_fd_limit()
    # Ctrl-C reaches the whole process group: the orchestrator reports it, this process just ends.
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve_jobs())
