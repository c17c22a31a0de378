"""Password hashing with Argon2 (through libpass, the maintained fork of passlib).

Argon2 has no 72-byte limit, unlike bcrypt, and is what current guidance prefers.
"""

from functools import cache

from passlib.context import CryptContext

MIN_PASSWORD_LENGTH = 8

_context = CryptContext(schemes=["argon2"])


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
