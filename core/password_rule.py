"""The one rule every password meets: the admin API, `/me/password`, `manage.py` and ADMIN_PASSWORD all ask
it. Hashing is `auth.passwords`'."""

from core.common_passwords import is_common_password
from core.text import is_valid_text

MIN_PASSWORD_LENGTH = 8
# In characters: 1024 of them take at most 4096 bytes in UTF-8, within passlib's own limit (4096), past which
# it raises PasswordSizeError, which was a 500 on /admin/users and /me/password (issue 9, item 7).
MAX_PASSWORD_LENGTH = 1024


def password_problem(password: str) -> str | None:
    """Why a password may not be used, or None if it may."""
    if not is_valid_text(password):
        return "must be valid text (it holds a lone surrogate, such as \\ud800)"
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"must be at least {MIN_PASSWORD_LENGTH} characters"
    if len(password) > MAX_PASSWORD_LENGTH:
        return f"must be at most {MAX_PASSWORD_LENGTH} characters"
    if is_common_password(password):
        return (
            "is too common (one of the 10,000 most common passwords, "
            "perhaps with a few digits or symbols added)"
        )
    return None
