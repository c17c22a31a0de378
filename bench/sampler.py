"""Samples a relay's memory, file descriptors and sockets, and the machine's CPU, every few seconds.

A thread in the orchestrator does the sampling, so the processes under test do no work for it beyond what
the kernel does to answer /proc. Used by the soak, where a figure that climbs for ten minutes under steady
load is a leak.
"""

import threading
import time
from collections import Counter
from collections.abc import Callable

import psutil

from bench.procs import cpu_readings, open_fds, rss_bytes


def sockets(processes: list[psutil.Process]) -> Counter:
    """The processes' TCP sockets, counted by state (ESTABLISHED, CLOSE_WAIT, LISTEN, ...)."""
    return Counter(conn.status for proc in processes for conn in proc.net_connections(kind="tcp"))


def regular_files(processes: list[psutil.Process]) -> list[str]:
    """Paths of the regular files the processes hold open (uploads, the database, logs)."""
    return sorted(opened.path for proc in processes for opened in proc.open_files())


class ResourceSampler:
    """Every `interval` seconds while the block runs, appends a sample to `samples`:

    {"t_s", "rss_mb", "fds", "tcp", "close_wait", "files", "threads", "cpu": {group: % of one core},
     **extra()}

    `cpu_groups` names the processes whose CPU to show next to "other" (the rest of the machine) and
    "steal"; `extra` adds figures read elsewhere (the upstream's open connections); `on_sample` sees each
    sample as it is taken (progress lines).
    """

    def __init__(
        self,
        processes: list[psutil.Process],
        interval: float,
        cpu_groups: dict[str, list[psutil.Process]],
        extra: Callable[[], dict] | None = None,
        on_sample: Callable[[dict], None] | None = None,
    ):
        self._processes = processes
        self._interval = interval
        self._cpu_groups = cpu_groups
        self._extra = extra
        self._on_sample = on_sample
        self._stop = threading.Event()
        self.samples: list[dict] = []

    def take(self) -> dict:
        """One sample now, without CPU figures (those need two readings): for before and after the load."""
        tcp = sockets(self._processes)
        return {
            "rss_mb": round(rss_bytes(self._processes) / 2**20, 2),
            "fds": open_fds(self._processes),
            "tcp": sum(tcp.values()),
            # A socket the peer closed but we never did: the signature of a connection leak.
            "close_wait": tcp.get(psutil.CONN_CLOSE_WAIT, 0),
            "files": len(regular_files(self._processes)),
            # Worker threads come and go (anyio retires one idle for 10 s): whatever a thread opened and
            # nobody closes when it goes shows as files or fds outgrowing this.
            "threads": sum(proc.num_threads() for proc in self._processes),
            **(self._extra() if self._extra else {}),
        }

    def __enter__(self) -> "ResourceSampler":
        self._start = time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        last_time, last_cpu = self._start, cpu_readings(self._cpu_groups)
        number = 0
        while True:
            sample = {"t_s": round(time.monotonic() - self._start, 2), **self.take()}
            now, cpu = time.monotonic(), cpu_readings(self._cpu_groups)
            if number:
                # Counters tick every 10 ms, so "other", a difference, can dip just below zero.
                sample["cpu"] = {
                    name: round(max(0.0, 100 * (cpu[name] - last_cpu[name]) / (now - last_time)), 1)
                    for name in cpu
                }
            last_time, last_cpu = now, cpu
            self.samples.append(sample)
            if self._on_sample:
                self._on_sample(sample)
            number += 1
            # On a fixed schedule, so slow samples do not stretch the interval.
            if self._stop.wait(max(0.0, self._start + number * self._interval - time.monotonic())):
                return

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
