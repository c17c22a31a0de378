"""First start with nothing configured, as `make run` does it: `python main.py` in an empty folder."""

import os
import re
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from core.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SETTING_NAMES = {name.upper() for name in Settings.model_fields}
PASSWORD_LINE = re.compile(r"password: (\S+)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _clean_environment(**settings: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in SETTING_NAMES}
    return env | settings


@contextmanager
def running_main(folder: Path, **settings: str) -> Iterator[tuple[str, Path]]:
    """`python main.py` with only these settings, from `folder`; yields its URL and console output file."""
    port = _free_port()
    console = folder / f"console-{port}.txt"
    with open(console, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "main.py")],
            cwd=folder,
            env=_clean_environment(PORT=str(port), **settings),
            stdout=output,
            stderr=subprocess.STDOUT,
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
        yield url, console
    finally:
        process.terminate()
        process.wait(timeout=15)


def _login(url: str, email: str, password: str) -> httpx.Response:
    return httpx.post(f"{url}/login", json={"email": email, "password": password})


def test_first_start_prints_a_generated_admin_password_once(tmp_path, ollama):
    with running_main(tmp_path, OLLAMA_URL=ollama.url) as (url, console):
        printed = PASSWORD_LINE.findall(console.read_text())
        assert len(printed) == 1
        password = printed[0]
        first = _login(url, "admin@local", password)
        assert first.status_code == 200
        token = first.json()["access_token"]
        assert _login(url, "admin@local", "changeme").status_code == 401

    key_file = tmp_path / "data" / "secret_key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert password not in (tmp_path / "data" / "gateway.sqlite3").read_bytes().decode("latin-1")

    with running_main(tmp_path, OLLAMA_URL=ollama.url) as (url, console):
        assert PASSWORD_LINE.findall(console.read_text()) == []
        assert _login(url, "admin@local", password).status_code == 200
        # The key was kept, so tokens issued before the restart still work.
        models = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {token}"})
        assert models.status_code == 200


def test_two_fresh_installs_get_different_passwords(tmp_path, ollama):
    passwords = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        with running_main(folder, OLLAMA_URL=ollama.url) as (_, console):
            passwords += PASSWORD_LINE.findall(console.read_text())
    assert len(passwords) == 2
    assert passwords[0] != passwords[1]


def test_a_configured_admin_password_is_used_and_never_printed(tmp_path, ollama):
    password = "a-long-configured-password"
    with running_main(tmp_path, OLLAMA_URL=ollama.url, ADMIN_PASSWORD=password) as (url, console):
        assert password not in console.read_text()
        assert PASSWORD_LINE.findall(console.read_text()) == []
        assert _login(url, "admin@local", password).status_code == 200


@pytest.mark.parametrize(
    ("setting", "value"),
    [("SECRET_KEY", "your-secret-key-here"), ("ADMIN_PASSWORD", "changeme"), ("PORT", "not-a-port")],
)
def test_a_weak_or_invalid_setting_stops_start_up_with_one_clear_line(tmp_path, setting, value):
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py")],
        cwd=tmp_path,
        env=_clean_environment(**{setting: value}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "configuration error" in result.stderr
    assert setting.lower() in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
