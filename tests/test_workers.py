"""Several workers (`uvicorn --workers N`): each would keep its own slots, queue, caps and quota counts, so
without Redis the gateway refuses to start as one of them, in one line; with REDIS_URL they start. The
workers are real uvicorn processes on loopback."""

import secrets
import subprocess
import sys
import time

import httpx
import pytest

from core.workers import workers_started_with
from tests.processes import REPO, clean_environment, free_port

UVICORN = [sys.executable, "-m", "uvicorn", "main:app", "--http", "core.server:HeaderTimeoutProtocol"]


@pytest.mark.parametrize(
    ("argv", "environment", "workers"),
    [
        (["/srv/venv/bin/uvicorn", "main:app", "--workers", "4"], {}, 4),
        (["python", "-m", "uvicorn", "main:app", "--workers=3"], {}, 3),
        (["uvicorn", "main:app"], {"WEB_CONCURRENCY": "2"}, 2),
        (["uvicorn", "main:app", "--workers", "1"], {"WEB_CONCURRENCY": "8"}, 1),
        (["/usr/bin/gunicorn", "-k", "uvicorn.workers.UvicornWorker", "-w", "5", "main:app"], {}, 5),
        (["gunicorn", "-w3", "main:app"], {}, 3),
        (["uvicorn", "main:app"], {}, 1),
        (["uvicorn", "main:app", "--workers", "many"], {}, 1),
        (["/usr/bin/python3", "main.py"], {"WEB_CONCURRENCY": "4"}, 1),  # not a server that forks workers
        (["bash", "-c", "uvicorn main:app --workers 4"], {}, 1),  # a shell: its child is the server
    ],
)
def test_the_worker_count_is_read_from_the_servers_command_line(argv, environment, workers):
    assert workers_started_with(argv, environment) == workers


def _settings(data_dir) -> dict[str, str]:
    return {
        "DATA_DIR": str(data_dir),
        "OLLAMA_URL": "http://127.0.0.1:9",
        "SECRET_KEY": secrets.token_urlsafe(40),
        "ADMIN_PASSWORD": "Fleet-of-workers-6120",
    }


def test_two_workers_without_redis_refuse_to_start_in_one_line(tmp_path):
    port = free_port()
    finished = subprocess.run(
        [*UVICORN, "--workers", "2", "--port", str(port)],
        cwd=REPO,
        env=clean_environment(**_settings(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [line for line in finished.stderr.splitlines() if "ollama-gateway:" in line]
    assert lines, finished.stderr
    assert "2 workers without REDIS_URL" in lines[0]
    assert "Traceback" not in finished.stderr
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)


def test_two_workers_with_redis_start_and_serve(tmp_path, redis_keys):
    port = free_port()
    settings = _settings(tmp_path) | {"REDIS_URL": redis_keys.url, "REDIS_PREFIX": redis_keys.prefix}
    log = tmp_path / "workers.log"
    with (
        open(log, "wb") as output,
        subprocess.Popen(
            [*UVICORN, "--workers", "2", "--port", str(port)],
            cwd=REPO,
            env=clean_environment(**settings),
            stdout=output,
            stderr=subprocess.STDOUT,
        ) as process,
    ):
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
                    break
                except httpx.TransportError:
                    assert process.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, "the workers never served"
                    time.sleep(0.2)
        finally:
            process.terminate()
            process.wait(timeout=30)
