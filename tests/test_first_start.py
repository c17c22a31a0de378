"""First start with nothing configured, as `make run` does it: `python main.py` in an empty folder."""

import re
import socket
import stat
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.processes import REPO, clean_environment, free_port, running_main

PASSWORD_LINE = re.compile(r"password: (\S+)")
PROTOCOL = "core.server:HeaderTimeoutProtocol"


def _login(url: str, email: str, password: str) -> httpx.Response:
    return httpx.post(f"{url}/login", json={"email": email, "password": password})


def test_first_start_prints_a_generated_admin_password_once(tmp_path, ollama):
    with running_main(tmp_path, OLLAMA_URL=ollama.url) as (url, console, _):
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

    with running_main(tmp_path, OLLAMA_URL=ollama.url) as (url, console, _):
        assert PASSWORD_LINE.findall(console.read_text()) == []
        assert _login(url, "admin@local", password).status_code == 200
        # The key was kept, so tokens issued before the restart still work.
        models = httpx.get(f"{url}/models", headers={"Authorization": f"Bearer {token}"})
        assert models.status_code == 200


def test_a_taken_port_stops_the_first_start_before_the_admin_is_created(tmp_path, ollama):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _start_main(tmp_path, OLLAMA_URL=ollama.url, HOST="127.0.0.1", PORT=str(port))
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        f"ollama-gateway: cannot listen on 127.0.0.1:{port}: address already in use"
    ]
    assert "password" not in result.stdout + result.stderr
    assert not (tmp_path / "data").exists(), "nothing is created before the port is had"

    # Once the port is free, the first start that succeeds is the one that shows the password.
    with running_main(tmp_path, port=port, OLLAMA_URL=ollama.url) as (url, console, _):
        [password] = PASSWORD_LINE.findall(console.read_text())
        assert _login(url, "admin@local", password).status_code == 200


def test_two_fresh_installs_get_different_passwords(tmp_path, ollama):
    passwords = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        with running_main(folder, OLLAMA_URL=ollama.url) as (_, console, _):
            passwords += PASSWORD_LINE.findall(console.read_text())
    assert len(passwords) == 2
    assert passwords[0] != passwords[1]


def test_a_configured_admin_password_is_used_and_never_printed(tmp_path, ollama):
    password = "a-long-configured-password"
    with running_main(tmp_path, OLLAMA_URL=ollama.url, ADMIN_PASSWORD=password) as (url, console, _):
        assert password not in console.read_text()
        assert PASSWORD_LINE.findall(console.read_text()) == []
        assert _login(url, "admin@local", password).status_code == 200


# One wrong value for each kind of check; tests/test_settings_errors.py covers every setting.
BAD_SETTINGS = [
    pytest.param("OLLAMA_URL", "localhost:11434", id="url-without-scheme"),
    pytest.param("OLLAMA_URL", "http://localhost:11434/?x=1", id="url-with-query"),
    pytest.param("SECRET_KEY", "your-secret-key-here", id="weak-key"),
    pytest.param("ADMIN_EMAIL", "admin", id="not-an-email"),
    pytest.param("ADMIN_PASSWORD", "changeme", id="well-known-password"),
    pytest.param("ADMIN_PASSWORD", "password123", id="common-password-with-digits"),
    pytest.param("ADMIN_PASSWORD", "12345678", id="common-password"),
    pytest.param("ADMIN_PASSWORD", "x" * 1025, id="too-long-password"),
    pytest.param("ACCESS_TOKEN_EXPIRE_MINUTES", "1.5", id="fraction-for-whole-minutes"),
    pytest.param("LOGIN_MAX_FAILURES", "many", id="count-not-a-number"),
    pytest.param("MAX_UPLOAD_MB", "-1", id="negative-size"),
    pytest.param("UPSTREAM_IDLE_TIMEOUT", "0", id="zero-timeout"),
    pytest.param("REQUEST_BODY_TIMEOUT", "inf", id="infinite-timeout"),
    pytest.param("CORS_ORIGINS", "http://ok.example,garbage", id="not-an-origin"),
    pytest.param("TRUSTED_PROXIES", "10.0.0.0/8,proxy", id="not-a-network"),
    pytest.param("HOST", "http://0.0.0.0", id="host-with-scheme"),
    pytest.param("PORT", "not-a-port", id="bad-port"),
    pytest.param("PORT", "70000", id="port-out-of-range"),
    pytest.param("DATA_DIR", "{a_file}", id="data-dir-is-a-file"),
    # A stranger at one address could lock a person out by failing their email's limit alone.
    pytest.param("LOGIN_MAX_FAILURES", "60", id="email-limit-not-above-pair"),
]


def _start_main(folder, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "main.py")],
        cwd=folder,
        env=clean_environment(**settings),
        capture_output=True,
        text=True,
        timeout=30,
    )


def _assert_one_line_naming(result: subprocess.CompletedProcess, setting: str) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    assert lines[0].startswith("ollama-gateway: configuration error: ")
    assert setting in lines[0]
    return lines[0]


@pytest.mark.parametrize(("setting", "value"), BAD_SETTINGS)
def test_a_weak_or_invalid_setting_stops_start_up_with_one_clear_line(tmp_path, setting, value):
    a_file = tmp_path / "not-a-folder"
    a_file.write_text("")
    result = _start_main(tmp_path, **{setting: value.format(a_file=a_file)})
    line = _assert_one_line_naming(result, setting)
    assert "expected" in line
    if setting in ("SECRET_KEY", "ADMIN_PASSWORD"):
        assert value not in line
        assert "(hidden)" in line
    assert result.stdout == ""
    assert not (tmp_path / "data").exists()


def test_a_mistake_in_the_env_file_is_one_line_too(tmp_path):
    (tmp_path / ".env").write_text("OLLAMA_URL=http://localhost:11434\nPORT=eighty\n")
    _assert_one_line_naming(_start_main(tmp_path), "PORT")


def test_uvicorn_importing_the_app_with_a_bad_setting_stops_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(REPO), "main:app", "--http", PROTOCOL],
        cwd=tmp_path,
        env=clean_environment(OLLAMA_URL="localhost:11434", DATA_DIR=str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    _assert_one_line_naming(result, "OLLAMA_URL")
    assert not (tmp_path / "data").exists()


# sysfs lets nobody, root included, make a folder in it.
@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys")
def test_a_data_dir_that_cannot_be_made_stops_start_up_in_one_line_without_a_traceback(tmp_path, ollama):
    # A port of its own: the folder is found unusable only after the port is taken (core.listening).
    result = _start_main(
        tmp_path, OLLAMA_URL=ollama.url, DATA_DIR="/sys/ollama-gateway-data", PORT=str(free_port())
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if "DATA_DIR" in line]
    assert "configuration error: DATA_DIR='/sys/ollama-gateway-data': cannot use this folder" in line
    assert "password" not in result.stderr
