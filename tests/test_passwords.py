"""Password hashing: Argon2 holds 64 MiB per hash, so a burst of logins must not run them all at once, and
those waiting their turn must not hold a worker thread each."""

import asyncio
import threading
import time

import pytest

from auth import passwords
from core import common_passwords, password_rule


class _CountingContext:
    """Stands in for the Argon2 context: takes a while, and records how many run at the same time and in
    how many threads."""

    def __init__(self) -> None:
        self.running = 0
        self.most = 0
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def _work(self) -> None:
        with self._lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.get_ident())
        time.sleep(0.05)
        with self._lock:
            self.running -= 1

    def hash(self, password: str) -> str:
        self._work()
        return "hashed"

    def verify(self, password: str, password_hash: str) -> bool:
        self._work()
        return False


def test_a_burst_of_logins_runs_at_most_a_few_hashes_at_once_in_a_few_threads(monkeypatch):
    counting = _CountingContext()
    monkeypatch.setattr(passwords, "_context", counting)

    async def burst() -> None:
        hasher = passwords.PasswordHasher()
        await asyncio.gather(
            *(hasher.verify(f"guess-{n}", "x") for n in range(40)),
            *(hasher.hash(f"new-password-{n}") for n in range(20)),
        )

    asyncio.run(burst())
    assert 1 < counting.most <= passwords.MAX_CONCURRENT_HASHES
    # Sixty callers waited their turn on the event loop; a thread each would have been sixty threads.
    assert len(counting.threads) <= 2 * passwords.MAX_CONCURRENT_HASHES


def test_a_real_hash_verifies_and_a_wrong_password_does_not():
    stored = passwords.hash_password("correct horse battery")
    assert stored.startswith("$argon2")
    assert passwords.verify_password("correct horse battery", stored)
    assert not passwords.verify_password("correct horse battery!", stored)


@pytest.mark.parametrize(
    ("password", "problem"),
    [
        pytest.param("short", "at least 8", id="short"),
        pytest.param("changeme", "too common", id="gateway-default"),
        pytest.param("12345678", "too common", id="common"),
        pytest.param("password123", "too common", id="common-with-digits"),
        pytest.param("PassWord123", "too common", id="common-in-any-case"),
        pytest.param("Dragon2024!", "too common", id="common-with-digits-and-a-symbol"),
        pytest.param("12345678!", "too common", id="common-digits-with-a-symbol"),
        pytest.param("ollama123", "too common", id="gateway-default-with-digits"),
        pytest.param("password1234", "too common", id="common-with-four-digits"),
        pytest.param("Monkey12345", "too common", id="common-with-the-longest-tail-taken-off"),
        pytest.param("x" * 1025, "at most 1024", id="long"),
        pytest.param("é" * 1025, "at most 1024", id="long-in-bytes-too"),
        pytest.param("x" * 5000, "at most 1024", id="over-passlibs-limit"),
    ],
)
def test_the_one_password_rule_refuses(password, problem):
    found = password_rule.password_problem(password)
    assert found is not None
    assert problem in found


@pytest.mark.parametrize(
    "password",
    [
        "zq8vk3mw",
        "x" * 1024,
        "😀" * 1024,
        "correct horse battery",
        "fays-password-1",
        "Golf-2947-8812-6630-1194",
        "love84929371&*!@#$%^",
        "blue 7 391 204 885 613",
    ],
    ids=[
        "shortest",
        "longest",
        "widest",
        "phrase",
        "common-word-inside",
        "common-word-then-long-digit-groups",
        "common-word-then-long-digits-and-symbols",
        "common-word-then-spaced-digits",
    ],
)
def test_the_one_password_rule_accepts_and_argon2_can_hash_it(password):
    assert password_rule.password_problem(password) is None
    assert passwords.verify_password(password, passwords.hash_password(password))


def test_a_password_no_rule_allows_is_simply_wrong_never_an_error():
    stored = passwords.hash_password("correct horse battery")
    assert passwords.verify_password("x" * 5000, stored) is False
    assert asyncio.run(passwords.PasswordHasher().verify("x" * 5000, stored)) is False


def test_the_common_password_list_is_the_shipped_ten_thousand():
    common = common_passwords.common_passwords()
    assert len(common) > 9_900
    assert {"password", "qwerty", "letmein"} <= common
    assert common_passwords.common_passwords() is common, "read once"
