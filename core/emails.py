"""Email addresses: the one rule for every way an account gets one (POST /admin/users, `manage.py
create-user`, ADMIN_EMAIL), so the gateway never starts with an admin email that manage.py would refuse.

Deliberately loose: something@something, no whitespace, at most 254 characters (RFC 5321's limit), valid
text. `admin@local` must pass: it is the default, and a gateway on a LAN has no public domain.
"""

from core.text import is_valid_text

EMAIL_MAX_LENGTH = 254


def email_problem(value: str) -> str | None:
    """Why `value` (already stripped) is not an email address the gateway accepts, or None if it is."""
    local, at, domain = value.rpartition("@")
    if not at or not local or not domain or any(c.isspace() for c in value) or len(value) > EMAIL_MAX_LENGTH:
        return "not an email address"
    if not is_valid_text(value):
        return "not valid text (it holds a lone surrogate)"
    return None


def checked_email(value: str) -> str:
    """The address, stripped; ValueError if the rule refuses it (for pydantic validators)."""
    value = value.strip()
    problem = email_problem(value)
    if problem:
        raise ValueError(problem)
    return value
