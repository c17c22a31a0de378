"""First start with nothing configured, as `make run` does it: `python main.py` in an empty folder."""

import re
import stat
import subprocess
import sys

import httpx
import pytest

from tests.processes import REPO, clean_environment, running_main

PASSWORD_LINE = re.compile(r"password: (\S+)")


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


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("SECRET_KEY", "your-secret-key-here"),
        ("ADMIN_PASSWORD", "changeme"),
        ("ADMIN_PASSWORD", "x" * 1025),
        ("PORT", "not-a-port"),
        # A stranger at one address could lock a person out by failing their email's limit alone.
        ("LOGIN_MAX_FAILURES", "60"),
    ],
    ids=["weak-key", "well-known-password", "too-long-password", "bad-port", "email-limit-not-above-pair"],
)
def test_a_weak_or_invalid_setting_stops_start_up_with_one_clear_line(tmp_path, setting, value):
    result = subprocess.run(
        [sys.executable, str(REPO / "main.py")],
        cwd=tmp_path,
        env=clean_environment(**{setting: value}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode != 0
    assert "configuration error" in result.stderr
    assert setting.lower() in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()
