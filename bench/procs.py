"""Process plumbing shared by the bench's parts: fd limits, loopback ports, starting, watching, stopping."""

import asyncio
import contextlib
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import cast

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def raise_fd_limit() -> None:
    """Lifts the soft limit on open files to the hard one: every process here holds 1000+ sockets."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    """A loopback port free right now, for servers that must be told their port up front."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def spawn(argv: list[str], cwd: Path = REPO_ROOT, **kwargs) -> subprocess.Popen:
    """Starts a child (in the repo root unless told) with the fd limit raised, whatever the parent's was."""
    return subprocess.Popen(argv, cwd=cwd, preexec_fn=raise_fd_limit, **kwargs)


def spawn_python_module(module: str, *args: str) -> subprocess.Popen:
    """Starts one of the bench's own asyncio processes, talking to us over its stdin and stdout."""
    argv = [sys.executable, "-m", module, *args]
    return spawn(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            program = cast(list[str], proc.args)[0]  # spawn() takes an argv list
            raise RuntimeError(f"{program} exited with {proc.returncode} before listening on {port}")
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout} s")


def stop(proc: subprocess.Popen) -> None:
    """Stops a child and anything it started: politely first, then for sure."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    for child in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            stream.close()


def process_tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def rss_bytes(processes: list[psutil.Process]) -> int:
    return sum(proc.memory_info().rss for proc in processes)


def open_fds(processes: list[psutil.Process]) -> int:
    """File descriptors the processes hold: sockets, files, pipes, epoll."""
    return sum(proc.num_fds() for proc in processes)


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def _machine_seconds() -> tuple[float, float]:
    """CPU seconds the whole machine has been busy, and those the hypervisor took from it (steal)."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system + times.irq + times.softirq, times.steal


def cpu_readings(groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU seconds used so far by each named group, by the rest of the machine ("other") and lost to the
    hypervisor ("steal"); the difference of two readings over the time between them is a load."""
    readings = {name: _cpu_seconds(procs) for name, procs in groups.items()}
    busy, steal = _machine_seconds()
    readings["other"] = busy - sum(readings.values())
    readings["steal"] = steal
    return readings


class CpuMeter:
    """CPU use of named groups of processes while a block runs: the average, and the busiest quarter second.

    A group at ~100% of one core is a bottleneck; the client and the upstream must stay well below that for
    the relay's figures to mean anything. Two more groups tell whether the run was fair: "other", the rest
    of the machine (such as a test suite running meanwhile), and "steal", CPU the hypervisor gave elsewhere.
    """

    PERIOD = 0.25

    def __init__(self, groups: dict[str, list[psutil.Process]]):
        self._groups = groups
        self._stop = threading.Event()
        self._peaks = dict.fromkeys([*groups, "other", "steal"], 0.0)
        self.summary: dict[str, dict[str, float]] = {}

    def _read(self) -> dict[str, float]:
        return cpu_readings(self._groups)

    def __enter__(self) -> "CpuMeter":
        self._start = time.monotonic()
        self._first = self._read()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        last_time, last = self._start, self._first
        while not self._stop.wait(self.PERIOD):
            now, readings = time.monotonic(), self._read()
            for name, seconds in readings.items():
                self._peaks[name] = max(self._peaks[name], (seconds - last[name]) / (now - last_time))
            last_time, last = now, readings

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        elapsed = time.monotonic() - self._start
        for name, seconds in self._read().items():
            # Counters tick every 10 ms, so "other", a difference, can dip just below zero.
            used = max(0.0, seconds - self._first[name])
            self.summary[name] = {
                "cpu_s": round(used, 3),
                "avg_pct": round(100 * used / elapsed, 1),
                "peak_pct": round(100 * self._peaks[name], 1),
            }


async def stdin_closed() -> None:
    """Returns when our stdin reaches EOF: the orchestrator holds its other end, so it closes when the bench
    ends, however it ends, and a server waiting on this never outlives the bench."""
    loop = asyncio.get_running_loop()
    closed = loop.create_future()

    class Watch(asyncio.Protocol):
        def connection_lost(self, exc: Exception | None) -> None:
            if not closed.done():
                closed.set_result(None)

    await loop.connect_read_pipe(Watch, sys.stdin)
    await closed


def run_until_interrupted(main, argv: list[str]) -> None:
    """Run a bench entry point; Ctrl-C ends it with status 130 once its context managers have stopped every
    process it started."""
    try:
        sys.exit(main(argv))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
