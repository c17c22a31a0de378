"""However the gateway is started, its request-head and request-body timeouts apply, or it does not start.

uvicorn's own protocols time nothing out between a connection and a finished request head; the gateway's
protocol does (`core.server`). `python main.py` uses it; `uvicorn main:app` must be given it, and without it
the app refuses to start, in one line.
"""

import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.processes import REPO, clean_environment, free_port, running_main

START_TIMEOUT = 30.0


def _uvicorn(folder: Path, port: int, ollama_url: str, *options: str) -> subprocess.Popen:
    settings = {
        "OLLAMA_URL": ollama_url,
        "DATA_DIR": str(folder / "data"),
        "ADMIN_PASSWORD": "serving-test-password",
        "REQUEST_HEADER_TIMEOUT": "1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "main:app", "--port", str(port), *options],
        cwd=REPO,
        env=clean_environment(**settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_uvicorn_without_the_gateways_protocol_refuses_to_start_in_one_line(tmp_path, ollama):
    process = _uvicorn(tmp_path, free_port(), ollama.url)
    output, _ = process.communicate(timeout=START_TIMEOUT)
    text = output.decode()
    assert process.returncode != 0
    assert "Traceback" not in text
    [line] = [line for line in text.splitlines() if "configuration error" in line]
    assert "--http core.server:HeaderTimeoutProtocol" in line
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").glob("*.sqlite3*"))


def test_uvicorn_with_the_gateways_protocol_serves_with_its_header_timeout(tmp_path, ollama):
    port = free_port()
    process = _uvicorn(tmp_path, port, ollama.url, "--http", "core.server:HeaderTimeoutProtocol")
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as silent:
            started = time.monotonic()
            assert silent.recv(1) == b""  # closed by the gateway, without a word
        assert time.monotonic() - started < 3
    finally:
        process.terminate()
        process.communicate(timeout=15)


def test_ollama_down_at_start_is_said_once_as_a_warning_and_the_gateway_starts(tmp_path, unused_port):
    down = f"http://127.0.0.1:{unused_port}"
    with running_main(tmp_path, OLLAMA_URL=down, ADMIN_PASSWORD="serving-test-password") as (url, console, _):
        assert httpx.get(f"{url}/health").json()["ollama_reachable"] is False
        deadline = time.monotonic() + START_TIMEOUT
        while "Ollama is not reachable" not in console.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        said = [line for line in console.read_text().splitlines() if "Ollama is not reachable" in line]
    assert len(said) == 1
    assert down in said[0]
    assert "Traceback" not in console.read_text()


def test_ollama_up_at_start_draws_no_warning(tmp_path, ollama):
    with running_main(tmp_path, OLLAMA_URL=ollama.url, ADMIN_PASSWORD="serving-test-password") as (
        url,
        console,
        _,
    ):
        assert httpx.get(f"{url}/health").json()["ollama_reachable"] is True
        # The probe runs beside the start-up; /health answering means it has had its turn.
        time.sleep(0.5)
        assert "not reachable" not in console.read_text()
