"""Password hashing with Argon2 (through libpass, the maintained fork of passlib).

Argon2 has no 72-byte limit, unlike bcrypt, and is what current guidance prefers. Each hash or check holds
64 MiB while it runs, and they run in a pool of up to 40 worker threads: at most MAX_CONCURRENT_HASHES run at
once (found by the soak: a burst of logins briefly took 250 MB), the rest wait their turn.
"""

import threading
from functools import cache

from passlib.context import CryptContext

MIN_PASSWORD_LENGTH = 8
# Defaults published by this gateway's predecessors and the first guesses of anyone trying: never accepted.
WELL_KNOWN_PASSWORDS = frozenset(
    {
        "changeme",
        "password",
        "12345678",
        "123456789",
        "admin123",
        "adminadmin",
        "changeit",
        "letmein1",
        "ollama123",
    }
)

_context = CryptContext(schemes=["argon2"])

MAX_CONCURRENT_HASHES = 4
_hashing = threading.BoundedSemaphore(MAX_CONCURRENT_HASHES)


def password_problem(password: str) -> str | None:
    """Why a password may not be used, or None if it may."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"must be at least {MIN_PASSWORD_LENGTH} characters"
    if password.lower() in WELL_KNOWN_PASSWORDS:
        return "is a well-known default password"
    return None


def hash_password(password: str) -> str:
    with _hashing:
        return _context.hash(password)


def verify_password(password: str, password_hash: str) -> bool:
    with _hashing:
        return _context.verify(password, password_hash)


@cache
def _dummy_hash() -> str:
    return hash_password("not a real password: only spends the time a real check would")


def spend_verification_time(password: str) -> None:
    """Do the work of a failed check, so an unknown email answers as slowly as a wrong password."""
    verify_password(password, _dummy_hash())
