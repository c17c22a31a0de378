"""The project's gateway under test: uvicorn with one worker, as deployed, on a fresh data dir."""

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from bench.control import request, request_json
from bench.procs import HOST, REPO_ROOT, free_port, process_tree, spawn, stop

ADMIN_EMAIL = "bench@local"
START_TIMEOUT = 30


def available() -> bool:
    return (REPO_ROOT / "main.py").exists()


@contextlib.contextmanager
def run_gateway(
    upstream_ports: list[int],
    settings: dict[str, str] | None = None,
    keep_log: Path | None = None,
    root: Path = REPO_ROOT,
    workers: int = 1,
) -> Iterator[tuple[int, str, list[psutil.Process]]]:
    """Yields the gateway's port, a bearer token for it and its processes (uvicorn's and its workers').

    `upstream_ports`: its Ollama hosts (OLLAMA_URL lists them all); `settings` adds to or overrides its
    environment; `keep_log` is where to copy its log when it stops (the data dir, log included, is deleted);
    `root` is the source tree to run (an earlier version's); `workers`, uvicorn's `--workers` (more than one
    needs REDIS_URL in `settings`: the gateway refuses to start otherwise).
    """
    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    data_dir = tmp / "data"
    data_dir.mkdir()
    port = free_port()
    password = secrets.token_urlsafe(32)[:20]
    env = {
        **os.environ,
        "OLLAMA_URL": ",".join(f"http://{HOST}:{port}" for port in upstream_ports),
        "DATA_DIR": str(data_dir),
        "ADMIN_EMAIL": ADMIN_EMAIL,
        "ADMIN_PASSWORD": password,
        "SECRET_KEY": secrets.token_hex(32),
        **(settings or {}),
    }
    argv = [
        sys.executable, "-m", "uvicorn", "main:app", "--host", HOST, "--port", str(port),
        "--loop", "uvloop", "--http", "core.server:HeaderTimeoutProtocol", "--workers", str(workers),
        "--no-access-log",
    ]  # fmt: skip
    log_path = tmp / "gateway.log"
    with log_path.open("wb") as log:
        proc = spawn(argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(port, proc, log_path)
            # The settings' admin, if they name one: gateways sharing a database share its first admin.
            login = {"email": env["ADMIN_EMAIL"], "password": env["ADMIN_PASSWORD"]}
            token = request_json("POST", port, "/login", login)["access_token"]
            yield port, token, process_tree(proc.pid)
        finally:
            stop(proc)
            if keep_log is not None:
                keep_log.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log_path, keep_log)
            shutil.rmtree(tmp, ignore_errors=True)


def signed_in_user(port: int, admin_token: str, email: str) -> str:
    """Adds an ordinary user (a person of their own for the fair queue) and returns their bearer token."""
    password = secrets.token_urlsafe(24)
    user = {"email": email, "password": password, "role": "user", "models": None}
    request_json("POST", port, "/admin/users", user, {"Authorization": f"Bearer {admin_token}"})
    return request_json("POST", port, "/login", {"email": email, "password": password})["access_token"]


def _wait_healthy(port: int, proc: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if request("GET", port, "/health")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    log = log_path.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"the gateway did not answer GET /health with 200 within {START_TIMEOUT} s:\n{log}")
