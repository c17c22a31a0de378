"""Common passwords: the first ones anyone guesses, never accepted for an account.

The list is SecLists' 10,000 most common passwords (`common_passwords.txt`; its source and licence are in
`common_passwords.txt.license`), plus the defaults this gateway's predecessors published. It is compared
case-insensitively, and also with the few digits and symbols people add at the end to get a common password
past a rule taken off: `password123` and `Dragon2024!` are as easy to guess as `password` and `dragon`
(issue 10, item 3: `password123` was accepted while `12345678` was refused). Only a short tail is taken off:
a long one is strength of its own, and `Golf-2947-8812-6630-1194` is no easier to guess than any other
twenty random digits.
"""

import string
from functools import cache
from pathlib import Path

LIST_FILE = Path(__file__).with_name("common_passwords.txt")
# Defaults published by this gateway's predecessors that the list does not hold.
GATEWAY_DEFAULTS = frozenset({"adminadmin", "changeit", "ollama"})

_SYMBOLS = string.punctuation + " "
_DIGITS_AND_SYMBOLS = string.digits + _SYMBOLS
# The longest tail taken off: enough for a year and a mark (`2024!`), the longest habit that lists of
# real passwords show; every character past it is one more to guess.
MAX_ADDED = 5


@cache
def common_passwords() -> frozenset[str]:
    """The list, lower-cased; read once per process (about 10,000 short lines)."""
    with LIST_FILE.open(encoding="utf-8") as lines:
        return frozenset(line.strip().lower() for line in lines if line.strip()) | GATEWAY_DEFAULTS


def is_common_password(password: str) -> bool:
    known = common_passwords()
    lowered = password.lower()
    # Symbols alone taken off too: `12345678!` has no letters to fall back on.
    return any(
        candidate in known
        for candidate in (
            lowered,
            _without_short_tail(lowered, _SYMBOLS),
            _without_short_tail(lowered, _DIGITS_AND_SYMBOLS),
        )
    )


def _without_short_tail(password: str, tail: str) -> str:
    """`password` without the characters of `tail` it ends with, if they are at most MAX_ADDED."""
    stem = password.rstrip(tail)
    return stem if len(password) - len(stem) <= MAX_ADDED else password
