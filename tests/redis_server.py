"""A real Redis for the tests, never a fake: TEST_REDIS_URL if set; else the server on 127.0.0.1:6379 if it
answers PING; else a throwaway `redis-server` started here on a free loopback port, in a temporary folder,
with nothing saved to disk, and stopped at the end of the run. Tests that start Redis themselves (to see the
gateway recover when it appears) use `ThrowawayRedis` too. `make redis-tools` installs Debian's
redis-server when it is missing.

Each test gets a key prefix of its own (`KeySpace`) and its keys are deleted after it, so runs sharing one
Redis, or a Redis that serves something else, never see each other's keys.
"""

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from tests.processes import free_port

LOCAL_URL = "redis://127.0.0.1:6379/0"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0


def redis_server_binary() -> str:
    # Debian installs it in /usr/bin, but a PATH without it should not matter.
    found = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/local/bin:/usr/bin:/bin")
    if found is None:
        raise RuntimeError("no redis-server to start a throwaway Redis with: run `make redis-tools`")
    return found


def answers(url: str, timeout: float = 0.5) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class ThrowawayRedis:
    """`redis-server` on 127.0.0.1:`port` (a free one by default), saving nothing, until `stop`."""

    def __init__(self, port: int | None = None) -> None:
        binary = redis_server_binary()
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._folder = Path(tempfile.mkdtemp(prefix="gateway-test-redis-"))
        self._log = open(self._folder / "server.log", "wb")  # noqa: SIM115 (closed in stop)
        self._process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self._folder),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while not answers(self.url, timeout=0.2):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}: {self._log_text()}")
            time.sleep(0.02)

    def _log_text(self) -> str:
        return (self._folder / "server.log").read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=STOP_TIMEOUT)
        self._log.close()
        shutil.rmtree(self._folder, ignore_errors=True)


class RedisForTests:
    """The Redis this test run uses, and the throwaway server behind it, if one was started."""

    def __init__(self) -> None:
        self.throwaway: ThrowawayRedis | None = None
        configured = os.environ.get("TEST_REDIS_URL")
        if configured:
            self.url = configured
        elif answers(LOCAL_URL):
            self.url = LOCAL_URL
        else:
            self.throwaway = ThrowawayRedis()
            self.url = self.throwaway.url
        self.run_prefix = f"gateway-test-{secrets.token_hex(4)}:"
        self._spaces = 0

    def key_space(self) -> "KeySpace":
        self._spaces += 1
        return KeySpace(self.url, f"{self.run_prefix}{self._spaces}:")

    def stop(self) -> None:
        if self.throwaway is not None:
            self.throwaway.stop()


class KeySpace:
    """A key prefix of one test's own on the run's Redis; `clear` deletes every key under it."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix

    def clear(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=500))
            if keys:
                client.delete(*keys)
        finally:
            client.close()
