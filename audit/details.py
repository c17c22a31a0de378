"""What an entry's `details` say: the fields of a request as JSON, and never a secret.

`sent_fields` records what a request body sent, whichever fields its model has: a field added to a PATCH
later (a quota, say) is in the trail with no code of its own. What is kept out is decided by name and by
form, also with no list of fields to keep up to date: any field named like a secret (at any depth) is said
as "changed" (or "set"), and any URL loses the user:password in it (a host's credentials are never shown).
"""

from typing import Any

from pydantic import BaseModel
from yarl import URL

# Names of fields whose value is never written down.
SECRET_NAMES = frozenset(
    {"password", "new_password", "current_password", "password_hash", "key", "key_hash", "secret", "token"}
)
CHANGED = "changed"
SET = "set"


def sent_fields(body: BaseModel, *, secret_as: str = CHANGED) -> dict[str, Any]:
    """The fields the client sent (nested ones too), with their values, secrets concealed."""
    return concealed(body.model_dump(mode="json", exclude_unset=True), secret_as)


def every_field(body: BaseModel, *, secret_as: str = SET) -> dict[str, Any]:
    """Every field, defaults included (what a creation made), secrets concealed."""
    return concealed(body.model_dump(mode="json"), secret_as)


def concealed(fields: dict[str, Any], secret_as: str = CHANGED) -> dict[str, Any]:
    return {
        name: secret_as if _is_secret_name(name) and value is not None else _shown(value, secret_as)
        for name, value in fields.items()
    }


def _is_secret_name(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_NAMES or lowered.endswith(("_password", "_secret", "_token"))


def _shown(value: Any, secret_as: str) -> Any:
    if isinstance(value, dict):
        return concealed(value, secret_as)
    if isinstance(value, list):
        return [_shown(item, secret_as) for item in value]
    if isinstance(value, str) and "@" in value and "://" in value:
        return without_credentials(value)
    return value


def without_credentials(text: str) -> str:
    try:
        url = URL(text)
    except (ValueError, TypeError):
        return "(not shown: it may hold credentials)"
    if url.user is None and url.password is None:
        return text
    return str(url.with_user(None))
