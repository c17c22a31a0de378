"""The gateway as a real process, started the way `make run` starts it: `python main.py`."""

import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx

from core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SETTING_NAMES = {name.upper() for name in Settings.model_fields}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_environment(**settings: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in SETTING_NAMES}
    return env | settings


def _limit_open_files(soft: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


@contextmanager
def running_main(
    folder: Path,
    open_files: int | None = None,
    launcher: Sequence[str] = (),
    port: int | None = None,
    **settings: str,
) -> Iterator[tuple[str, Path, int]]:
    """`python main.py` with only these settings, from `folder`; yields its URL, console output file and
    process id. `open_files`: start it with that soft limit on open files, as many systems do (1024).
    `launcher`: a command that is handed `python main.py` as its arguments and runs it. `port`: listen there
    (default: any free one)."""
    port = port or free_port()
    console = folder / f"console-{port}.txt"
    with open(console, "wb") as output:
        process = subprocess.Popen(
            [*launcher, sys.executable, str(REPO / "main.py")],
            cwd=folder,
            env=clean_environment(PORT=str(port), **settings),
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=None if open_files is None else lambda: _limit_open_files(open_files),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/health", timeout=1)
                break
            except httpx.TransportError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(console.read_text()) from None
                time.sleep(0.1)
        yield url, console, process.pid
    finally:
        process.terminate()
        process.wait(timeout=15)
