"""Password hashing with Argon2 (through libpass, the maintained fork of passlib).

Argon2 has no 72-byte limit, unlike bcrypt, and is what current guidance prefers.
"""

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


def password_problem(password: str) -> str | None:
    """Why a password may not be used, or None if it may."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"must be at least {MIN_PASSWORD_LENGTH} characters"
    if password.lower() in WELL_KNOWN_PASSWORDS:
        return "is a well-known default password"
    return None


def hash_password(password: str) -> str:
    return _context.hash(password)


def verify_password(password: str, password_hash: str) -> bool:
    return _context.verify(password, password_hash)


@cache
def _dummy_hash() -> str:
    return _context.hash("not a real password: only spends the time a real check would")


def spend_verification_time(password: str) -> None:
    """Do the work of a failed check, so an unknown email answers as slowly as a wrong password."""
    _context.verify(password, _dummy_hash())
