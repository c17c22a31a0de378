"""SIGTERM (a deploy, a restart, `systemctl stop`) on `python main.py` while people use it: streams already
running finish, up to GRACEFUL_SHUTDOWN_SECONDS; new connections are refused; nothing is left written
half-way in the database or the uploads folder."""

import json
import signal
import socket
import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import psutil
import pytest

from tests import rawhttp
from tests.processes import running_main
from tests.streams import chat_body

ADMIN_PASSWORD = "shutdown-test-password"
BOUNDARY = "shutdown-boundary"


class Stream(threading.Thread):
    """One client's chat stream, read line by line in the background."""

    def __init__(self, url: str, token: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url, self.token, self.body = url, token, body
        self.flowing = threading.Event()
        self.lines: list[dict] = []
        self.failure: Exception | None = None

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        try:
            with (
                httpx.Client(base_url=self.url, headers=headers, timeout=30) as http,
                http.stream("POST", "/chat", json=self.body) as response,
            ):
                for line in response.iter_lines():
                    self.lines.append(json.loads(line))
                    self.flowing.set()
        except httpx.HTTPError as exc:
            self.failure = exc


def _login(url: str) -> str:
    login = {"email": "admin@local", "password": ADMIN_PASSWORD}
    return httpx.post(f"{url}/login", json=login).json()["access_token"]


def _wait_for_exit(pid: int, timeout: float) -> float:
    """Seconds until the process exited."""
    started = time.monotonic()
    psutil.Process(pid).wait(timeout=timeout)
    return time.monotonic() - started


def _refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def _running_main(tmp_path: Path, ollama, graceful: float) -> AbstractContextManager[tuple[str, Path, int]]:
    return running_main(
        tmp_path,
        OLLAMA_URL=ollama.url,
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        GRACEFUL_SHUTDOWN_SECONDS=str(graceful),
    )


def test_sigterm_is_a_clean_exit_with_status_0(tmp_path, ollama):
    """`systemctl stop` or `kill`: the process exits 0 with nothing alarming said (`make run` printed
    "Terminated" after uvicorn raised SIGTERM again on itself, exit status 143)."""
    with _running_main(tmp_path, ollama, graceful=5) as (url, console, pid):
        assert httpx.get(f"{url}/health").status_code == 200
        process = psutil.Process(pid)
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=15)
    assert status == 0
    assert "Traceback" not in console.read_text()


def test_sigterm_lets_running_streams_finish_and_refuses_new_connections(tmp_path, ollama):
    with _running_main(tmp_path, ollama, graceful=10) as (url, _, pid):
        token = _login(url)
        streams = [Stream(url, token, chat_body(tokens=15, interval=0.1)) for _ in range(3)]
        for stream in streams:
            stream.start()
        assert all(stream.flowing.wait(10) for stream in streams)
        psutil.Process(pid).send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert _refuses_connections(url)
        exited_after = _wait_for_exit(pid, timeout=10)
        for stream in streams:
            stream.join(timeout=10)
    for stream in streams:
        assert stream.failure is None
        assert len(stream.lines) == 16
        assert stream.lines[-1]["done"] is True
    assert exited_after < 5


def test_sigterm_ends_streams_still_running_after_the_graceful_timeout_with_an_error_line(tmp_path, ollama):
    graceful = 1.0
    with _running_main(tmp_path, ollama, graceful) as (url, _, pid):
        stream = Stream(url, _login(url), chat_body(tokens=1000, interval=0.05))
        stream.start()
        assert stream.flowing.wait(10)
        psutil.Process(pid).send_signal(signal.SIGTERM)
        exited_after = _wait_for_exit(pid, timeout=graceful + 10)
        stream.join(timeout=10)
    assert exited_after < graceful + 2
    assert stream.failure is None, "the stream was cut without a last line"
    assert "shutting down" in stream.lines[-1]["error"]
    assert not any(line.get("done") for line in stream.lines)
    record = ollama.wait_for_stream_end(timeout=5)
    assert record.client_gone_at is not None  # and Ollama stopped generating


def test_sigterm_answers_a_request_still_waiting_for_the_model_503_after_the_graceful_timeout(
    tmp_path, ollama
):
    graceful = 1.0
    with _running_main(tmp_path, ollama, graceful) as (url, _, pid):
        token = _login(url)
        answers: list[httpx.Response] = []
        waiting = threading.Thread(
            target=lambda: answers.append(
                httpx.post(
                    f"{url}/chat",
                    json=chat_body(load=30),  # a model load that would take half a minute
                    headers={"Authorization": f"Bearer {token}"},
                    timeout=30,
                )
            )
        )
        waiting.start()
        deadline = time.monotonic() + 10
        while not ollama.streams and time.monotonic() < deadline:  # Ollama got it, and is "loading"
            time.sleep(0.01)
        psutil.Process(pid).send_signal(signal.SIGTERM)
        _wait_for_exit(pid, timeout=graceful + 10)
        waiting.join(timeout=10)
    assert answers[0].status_code == 503
    assert "shutting down" in answers[0].json()["error"]


def _multipart_head(filename: str) -> bytes:
    return (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()


def _start_upload(url: str, token: str, size: int) -> socket.socket:
    """An upload whose multipart body is `size` bytes of file plus framing; only its head is sent."""
    length = len(_multipart_head("big.bin")) + size + len(f"\r\n--{BOUNDARY}--\r\n")
    headers = {
        "Authorization": f"Bearer {token}",
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}",
        "Content-Length": str(length),
    }
    sock = rawhttp.open_post(url, "/upload", headers)
    sock.sendall(_multipart_head("big.bin"))
    return sock


def _stored(data_dir: Path) -> tuple[list[str], list[str]]:
    """What the stopped gateway left: upload records in the database, and files in the uploads folder."""
    with sqlite3.connect(data_dir / "gateway.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        records = [row[0] for row in db.execute("SELECT filename FROM uploads")]
    return sorted(records), sorted(path.name for path in (data_dir / "uploads").iterdir())


def test_sigterm_during_an_upload_lets_it_complete(tmp_path, ollama):
    piece = b"\0" * (256 * 1024)
    with _running_main(tmp_path, ollama, graceful=10) as (url, _, pid):
        sock = _start_upload(url, _login(url), 8 * len(piece))
        with sock:
            sock.sendall(piece)
            psutil.Process(pid).send_signal(signal.SIGTERM)
            for _ in range(7):
                time.sleep(0.1)
                sock.sendall(piece)
            sock.sendall(f"\r\n--{BOUNDARY}--\r\n".encode())
            response = rawhttp.read_response(sock)
        _wait_for_exit(pid, timeout=10)
    assert response.status_code == 201
    records, files = _stored(tmp_path / "data")
    assert records == files == [response.json()["filename"]]


def test_sigterm_during_an_upload_that_never_finishes_keeps_nothing(tmp_path, ollama):
    graceful = 1.0
    with _running_main(tmp_path, ollama, graceful) as (url, _, pid):
        sock = _start_upload(url, _login(url), 10 * 1024 * 1024)
        with sock:
            sock.sendall(b"\0" * (1024 * 1024))  # a tenth of the file, then the client stalls
            time.sleep(0.3)
            psutil.Process(pid).send_signal(signal.SIGTERM)
            _wait_for_exit(pid, timeout=graceful + 10)
    assert _stored(tmp_path / "data") == ([], [])


@pytest.fixture(autouse=True)
def _fresh_streams(ollama):
    """Each test looks at the fake Ollama's streams from a clean slate."""
    return ollama


def test_sigterm_answers_a_request_already_on_its_way_on_a_kept_alive_connection(tmp_path, ollama):
    """A proxy keeping connections to the gateway alive (nginx) may send its next request on one just as the
    gateway stops. Closed at once, that connection would fail the request with no answer, and the proxy does
    not resend a POST (a 502 in a rolling restart). It stays open for the keep-alive timeout instead: the
    request is answered, with `Connection: close`, and then the connection ends."""
    with _running_main(tmp_path, ollama, graceful=10) as (url, _, pid):
        host, port = url.removeprefix("http://").split(":")
        body = json.dumps({"email": "admin@local", "password": ADMIN_PASSWORD}).encode()
        post = (
            f"POST /login HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(post)
            first = rawhttp.read_response(sock)
            assert first.status_code == 200 and first.headers.get("connection") != "close"
            psutil.Process(pid).send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert _refuses_connections(url), "stopped listening"
            sock.sendall(post)  # on the connection kept alive, as a proxy would
            second = rawhttp.read_response(sock)
            assert second.status_code == 200, second
            assert "access_token" in second.json()
            assert second.headers.get("connection") == "close"
            assert sock.recv(1) == b"", "closed once answered"
        assert _wait_for_exit(pid, timeout=10) < 5


def test_sigterm_closes_a_kept_alive_connection_nobody_uses_within_the_keep_alive_timeout(tmp_path, ollama):
    """The connections left open for a proxy's request on its way are closed when none comes: the gateway
    stops within the keep-alive timeout (5 s), not the graceful timeout."""
    with _running_main(tmp_path, ollama, graceful=30) as (url, _, pid):
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
            assert rawhttp.read_response(sock).status_code == 200
            psutil.Process(pid).send_signal(signal.SIGTERM)
            exited_after = _wait_for_exit(pid, timeout=15)
            assert sock.recv(1) == b"", "closed by the gateway"
    assert exited_after < 6.5
