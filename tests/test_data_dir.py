"""DATA_DIR is private to the gateway's user, whatever the umask (issue 9, item 7): it holds password and key
hashes, the signing key and people's files."""

import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from db.legacy import MIGRATIONS


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual default: anything created without an explicit mode is readable by everyone."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def assert_private(data_dir: Path, upload: str) -> None:
    modes = {
        "data dir": mode(data_dir),
        "uploads dir": mode(data_dir / "uploads"),
        "database": mode(data_dir / "gateway.sqlite3"),
        "-wal": mode(data_dir / "gateway.sqlite3-wal"),
        "-shm": mode(data_dir / "gateway.sqlite3-shm"),
        "secret key": mode(data_dir / "secret_key"),
        "upload": mode(data_dir / "uploads" / upload),
    }
    assert modes == {
        "data dir": 0o700,
        "uploads dir": 0o700,
        "database": 0o600,
        "-wal": 0o600,
        "-shm": 0o600,
        "secret key": 0o600,
        "upload": 0o600,
    }
    for path in data_dir.rglob("*"):
        assert mode(path) & 0o077 == 0, f"{path} is {oct(mode(path))}"


def _upload(gateway) -> str:
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=30) as admin:
        response = admin.post("/upload", files={"file": ("notes.txt", b"private notes")})
        assert response.status_code == 201
        assert admin.post("/keys", json={"name": "k"}).status_code == 201
        return response.json()["filename"]


def test_everything_the_gateway_writes_is_private_under_umask_022(make_gateway, ollama, tmp_path, umask_022):
    data_dir = tmp_path / "data"
    gateway = make_gateway(data_dir=data_dir, secret_key=None)
    stored = _upload(gateway)
    assert_private(data_dir, stored)


def test_a_data_folder_left_readable_by_an_older_version_is_tightened_at_start(
    make_gateway, ollama, tmp_path, umask_022
):
    data_dir = tmp_path / "data"
    (data_dir / "uploads").mkdir(parents=True, mode=0o755)
    os.chmod(data_dir, 0o755)  # noqa: S103 -- what an older version left
    with sqlite3.connect(data_dir / "gateway.sqlite3") as db:  # as the second release left it
        db.execute("PRAGMA journal_mode = WAL")
        for script in MIGRATIONS[:2]:
            db.executescript(script)
        db.execute("PRAGMA user_version = 2")
    (data_dir / "secret_key").write_text("k" * 64)
    old_upload = "a" * 32 + "_old.txt"
    (data_dir / "uploads" / old_upload).write_bytes(b"old")
    for path in [data_dir / "gateway.sqlite3", data_dir / "secret_key", data_dir / "uploads" / old_upload]:
        os.chmod(path, 0o644)

    gateway = make_gateway(data_dir=data_dir, secret_key=None)
    _upload(gateway)
    assert_private(data_dir, old_upload)
