"""The soak's load client: a bounded pool of workers sending a gateway mixed traffic until a deadline.

Runs as its own process, like bench/client.py, whose response parser (Exchange) and job loop it reuses. It
takes one job on stdin:

  mixed   `workers` workers, each repeating until `duration_s` has passed: pick a kind of request by
          `weights`, send it on a new connection, wait for the whole answer, pause `think_ms`. Answers
          {"kinds": {kind: {"count", "ok", "errors": {problem: n}, "ms": durations of the good ones}}}

The kinds, as a browser app and its scripts use the gateway:

  login      POST /login with the job's email and password; the worker carries on with the new token
  models     GET /models
  tags       GET /api/tags
  chat       POST /chat, a paced stream read to its final `done` line
  chat_cut   POST /chat, hung up after a random number of lines, as a user stopping a reply
  upload     POST /upload, `upload_kb` of random bytes as the multipart field `file`
  download   GET /files/{name} of a recent upload; its bytes must all arrive
  delete     DELETE /files/{name}: uploads beyond the newest `keep_files` are deleted, so the gateway's
             disk use stays bounded however long the soak runs (not a kind to pick: uploads cause it)

Every loop is bounded by the deadline and every request by `timeout`, so the job always ends.
"""

import asyncio
import collections
import contextlib
import json
import os
import random
import time
from dataclasses import dataclass, field

import uvloop

from bench.client import Exchange, serve_jobs, start, wait_finished
from bench.procs import raise_fd_limit
from bench.stats import summarize_ms

KINDS = ("login", "models", "tags", "chat", "chat_cut", "upload", "download")


def http_request(
    method: str, path: str, target: dict, token: str | None, body: bytes = b"", content_type: str = ""
) -> bytes:
    # Connection: close, like bench/client.py: each request a connection of its own, the hardest case for
    # the gateway's sockets and file descriptors.
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: {target['host']}:{target['port']}",
        "Connection: close",
        f"Content-Length: {len(body)}",
    ]
    if content_type:
        head.append(f"Content-Type: {content_type}")
    if token:
        head.append(f"Authorization: Bearer {token}")
    return "\r\n".join(head).encode() + b"\r\n\r\n" + body


def multipart_file(data: bytes, filename: str) -> tuple[bytes, str]:
    """A multipart/form-data body with `data` as the field `file`, and its content type."""
    boundary = f"bench{os.urandom(12).hex()}"
    body = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body += data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


@dataclass
class Tally:
    """What one kind of request did: how many, how many good, what went wrong, how long the good ones took."""

    count: int = 0
    ok: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    durations: list[float] = field(default_factory=list)

    def record(self, exchange: Exchange, problem: str | None) -> None:
        self.count += 1
        if problem is None:
            self.ok += 1
            self.durations.append((exchange.t_end or time.monotonic()) - exchange.t_start)
        else:
            self.errors[problem] += 1

    def summary(self) -> dict:
        return {
            "count": self.count,
            "ok": self.ok,
            "errors": dict(self.errors),
            "ms": summarize_ms(self.durations),
        }


def problem_of(exchange: Exchange, status: int) -> str | None:
    """None when the exchange ended with the expected status, else a short description of what went wrong."""
    if exchange.error is not None:
        return exchange.error
    if exchange.status != status:
        return f"status {exchange.status}"
    return None


class Mix:
    """State the workers share: the job, its tallies and the pool of uploads to download or delete."""

    def __init__(self, job: dict):
        self.job = job
        self.target = {"host": job["host"], "port": job["port"]}
        self.rng = random.Random(job.get("seed", 1))
        self.tallies = {kind: Tally() for kind in (*KINDS, "delete")}
        self.files: collections.deque[str] = collections.deque()
        self.upload_bytes = job["upload_kb"] * 1024
        chat = {
            "model": "bench",
            "messages": [{"role": "user", "content": "Say something."}],
            "stream": True,
            "options": job["chat_options"],
        }
        self.chat_body = json.dumps(chat, separators=(",", ":")).encode()
        self.chat_lines = job["chat_options"]["bench_tokens"] + 1

    async def send(self, request: bytes, milestone_lines: int = 1) -> Exchange:
        exchange = await start(self.target, request, milestone_lines)
        await wait_finished([exchange], self.job["timeout"])
        return exchange


class Worker:
    """One user: its own token, one request at a time."""

    def __init__(self, mix: Mix, token: str):
        self.mix = mix
        self.token = token

    def request(self, method: str, path: str, body: bytes = b"", content_type: str = "") -> bytes:
        return http_request(method, path, self.mix.target, self.token, body, content_type)

    async def login(self) -> None:
        credentials = {"email": self.mix.job["email"], "password": self.mix.job["password"]}
        body = json.dumps(credentials).encode()
        exchange = await self.mix.send(
            http_request("POST", "/login", self.mix.target, None, body, "application/json")
        )
        problem = problem_of(exchange, 200)
        if problem is None:
            try:
                self.token = json.loads(exchange.tail())["access_token"]
            except (ValueError, KeyError):
                problem = "no token in the answer"
        self.mix.tallies["login"].record(exchange, problem)

    async def models(self) -> None:
        await self._get("models", "/models")

    async def tags(self) -> None:
        await self._get("tags", "/api/tags")

    async def _get(self, kind: str, path: str) -> None:
        exchange = await self.mix.send(self.request("GET", path))
        problem = problem_of(exchange, 200)
        if problem is None and b'"models"' not in exchange.tail():
            problem = "no model list"
        self.mix.tallies[kind].record(exchange, problem)

    async def chat(self) -> None:
        exchange = await self.mix.send(self.request("POST", "/chat", self.mix.chat_body, "application/json"))
        problem = problem_of(exchange, 200)
        if problem is None and (exchange.lines != self.mix.chat_lines or not exchange.final_line_done()):
            problem = f"incomplete stream: {exchange.lines} lines"
        self.mix.tallies["chat"].record(exchange, problem)

    async def chat_cut(self) -> None:
        mix = self.mix
        after = mix.rng.randint(*mix.job["cut_after_lines"])
        request = self.request("POST", "/chat", mix.chat_body, "application/json")
        exchange = await start(mix.target, request, milestone_lines=after)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(exchange.milestone), mix.job["timeout"])
        problem = problem_of(exchange, 200)
        if exchange.finished.done():
            problem = problem or f"ended before the hang-up, after {exchange.lines} lines"
        else:
            exchange.close()
            exchange.t_end = time.monotonic()
            if exchange.status != 200:
                problem = f"status {exchange.status}"
            elif exchange.lines < after:
                problem = f"stalled: {exchange.lines} of {after} lines in {mix.job['timeout']} s"
        mix.tallies["chat_cut"].record(exchange, problem)

    async def upload(self) -> None:
        mix = self.mix
        body, content_type = multipart_file(os.urandom(mix.upload_bytes), "soak.bin")
        exchange = await mix.send(self.request("POST", "/upload", body, content_type))
        problem = problem_of(exchange, 201)
        if problem is None:
            try:
                mix.files.append(json.loads(exchange.tail())["filename"])
            except (ValueError, KeyError):
                problem = "no filename in the answer"
        mix.tallies["upload"].record(exchange, problem)
        while len(mix.files) > mix.job["keep_files"]:
            await self.delete(mix.files.popleft())

    async def download(self) -> None:
        mix = self.mix
        if len(mix.files) < 2:
            await self.upload()
            return
        # Only the newer half: the oldest files are the next to be deleted, maybe while this one runs.
        name = mix.rng.choice(list(mix.files)[len(mix.files) // 2 :])
        exchange = await mix.send(self.request("GET", f"/files/{name}"))
        problem = problem_of(exchange, 200)
        if problem is None and exchange.bytes != mix.upload_bytes:
            problem = f"short download: {exchange.bytes} bytes"
        mix.tallies["download"].record(exchange, problem)

    async def delete(self, name: str) -> None:
        exchange = await self.mix.send(self.request("DELETE", f"/files/{name}"))
        self.mix.tallies["delete"].record(exchange, problem_of(exchange, 204))

    async def run(self, deadline: float) -> None:
        mix = self.mix
        kinds, weights = zip(*mix.job["weights"].items(), strict=True)
        low, high = mix.job["think_ms"]
        while time.monotonic() < deadline:
            kind = mix.rng.choices(kinds, weights)[0]
            try:
                await getattr(self, kind)()
            except Exception as error:  # a bug here must show in the results, not end the soak early
                mix.tallies[kind].count += 1
                mix.tallies[kind].errors[f"client error: {error!r}"[:200]] += 1
            await asyncio.sleep(mix.rng.uniform(low, high) / 1000)


async def run_mixed(job: dict) -> dict:
    mix = Mix(job)
    unknown = set(job["weights"]) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown kinds {sorted(unknown)}")
    started = time.monotonic()
    deadline = started + job["duration_s"]
    workers = [Worker(mix, job["token"]) for _ in range(job["workers"])]
    await asyncio.gather(*(worker.run(deadline) for worker in workers))
    # Leave the gateway's disk as it was: delete what is still kept.
    while mix.files:
        await workers[0].delete(mix.files.popleft())
    return {
        "duration_s": round(time.monotonic() - started, 1),
        "workers": job["workers"],
        "kinds": {kind: tally.summary() for kind, tally in mix.tallies.items()},
    }


if __name__ == "__main__":
    raise_fd_limit()
    # Ctrl-C reaches the whole process group: the orchestrator reports it, this process just ends.
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve_jobs({"mixed": run_mixed}))
