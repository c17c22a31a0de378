"""Handles on the bench's own subprocesses: the fake upstream and the load client.

Both are asyncio programs started with pipes on stdin and stdout. The upstream exits when its stdin closes
and answers control requests over HTTP; the client takes JSON jobs on stdin and answers on stdout.
"""

import http.client
import json
import time

import psutil

from bench.procs import HOST, spawn_python_module, stop


def request(
    method: str, port: int, path: str, body: dict | None = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """A small request to a loopback port on a connection of its own: (status, body bytes).

    Raises OSError when nothing answers.
    """
    data = None if body is None else json.dumps(body).encode()
    headers = {**({} if data is None else {"Content-Type": "application/json"}), **(headers or {})}
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def request_json(
    method: str, port: int, path: str, body: dict | None = None, headers: dict[str, str] | None = None
) -> dict:
    """A JSON request whose answer must be 2xx JSON; anything else raises RuntimeError."""
    status, payload = request(method, port, path, body, headers)
    if not 200 <= status < 300:
        raise RuntimeError(f"{method} {path} on port {port} answered {status}: {payload[:300]!r}")
    return json.loads(payload or b"{}")


class _BenchProcess:
    """A bench process of its own that speaks JSON lines on stdout, the first one saying it is ready.
    It is stopped on exit, or at once if it fails to start."""

    module: str
    args: tuple[str, ...] = ()

    def __enter__(self):
        self.proc = spawn_python_module(self.module, *self.args)
        try:
            self.ready = self.receive()
            self.process = psutil.Process(self.proc.pid)
        except BaseException:
            stop(self.proc)
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        stop(self.proc)

    def receive(self) -> dict:
        assert self.proc.stdout is not None  # spawn_python_module pipes it
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.module} exited with {self.proc.wait(timeout=5)}")
        return json.loads(line)


class Upstream(_BenchProcess):
    """The fake Ollama server (bench/upstream.py) in its own process; `parallel`: its slots per model, as
    Ollama's OLLAMA_NUM_PARALLEL, the rest waiting in its FIFO (None: no limit)."""

    module = "bench.upstream"

    def __init__(self, parallel: int | None = None):
        self.parallel = parallel
        self.args = () if parallel is None else ("--parallel", str(parallel))

    @property
    def port(self) -> int:
        return self.ready["port"]

    def stats(self) -> dict:
        return request_json("GET", self.port, "/_bench/stats")

    def disconnects(self) -> dict[str, float]:
        """bench_id -> time.monotonic() at which the upstream saw that stream's connection go."""
        entries = request_json("GET", self.port, "/_bench/disconnects")["disconnects"]
        return {entry["id"]: entry["t"] for entry in entries}

    def slots(self) -> dict:
        """{"parallel", "requests": [{"id", "arrived", "slot", "end"}]}: each labelled chat's slot."""
        return request_json("GET", self.port, "/_bench/slots")

    def reset(self) -> None:
        request_json("POST", self.port, "/_bench/reset")

    def wait_idle(self, timeout: float) -> int:
        """Waits until no stream runs or waits upstream; returns how many were left at the timeout."""
        deadline = time.monotonic() + timeout
        while (active := self.stats()["active_streams"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        return active


class LoadClient(_BenchProcess):
    """The load client (bench/client.py) in its own process, fed one job at a time.

    `module` names another client that serves jobs the same way, such as the soak's bench/traffic.py.
    """

    def __init__(self, module: str = "bench.client"):
        self.module = module

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None  # spawn_python_module pipes it
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def run(self, job: dict) -> dict:
        """Runs a job that needs no conversation and returns its result."""
        self.send(json.dumps(job))
        result = self.receive()
        del result["event"]
        return result
