"""Text from clients: only what UTF-8 can encode.

JSON lets a string hold a lone surrogate (`"\\ud800"`), and Python's `json` keeps it, but nothing that stores,
hashes or sends text can take it: SQLite and Argon2 raise on it. Such text is refused where it enters.
"""


def is_valid_text(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def holds_a_lone_surrogate(error: UnicodeEncodeError) -> bool:
    """Whether an encoding failed on a lone surrogate, which only a client's JSON can bring in."""
    return any(0xD800 <= ord(char) <= 0xDFFF for char in error.object[error.start : error.end])
