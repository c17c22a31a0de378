"""A mistake in the settings, said in one line: the setting as it is written in the environment, the value
given, and what it expects (issue 10, item 3). pydantic's own report takes several lines per mistake, and a
mistake reached by `uvicorn main:app` came with 57 lines of traceback.

    OLLAMA_URL='localhost:11434': expected a URL starting with http:// or https://, such as ...

Secrets are never repeated: their value shows as `(hidden)`, and so do the credentials, query and fragment
of a URL (`http://(hidden)@gpu-box:11434/?(hidden)`).
"""

import re
from typing import Any

from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from core.settings import ConfigurationError, Settings

HIDDEN = "(hidden)"
# A value longer than this is cut: the line must stay readable.
MAX_SHOWN_VALUE = 120
# A URL's credentials and query are used, never shown: OLLAMA_URL may carry `user:password@` or a token in
# `?api_key=`. A URL that is wrong may be too broken to parse, and a password may hold `/`, `?`, `#`, `:` or
# `@` itself: so everything before the LAST `@` goes (over-hiding a query's `@` is the safe mistake), then
# whatever follows the first `?` or `#` after it.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_QUERY_OR_FRAGMENT = re.compile(r"[?#]")
# OLLAMA_URL is hidden as a URL even without `://` (`user:password@host`), other values only with it.
_URL_SETTINGS = frozenset({"ollama_url"})


def configuration_error_line(error: ConfigurationError, program: str = "ollama-gateway") -> str:
    """What the gateway (or `manage.py`, as `program`) prints, alone, when it can't start because of
    `error`."""
    return f"{program}: configuration error: {error}"


def read_settings() -> Settings:
    """The settings from the environment and `.env`; ConfigurationError, in one line, for any mistake."""
    try:
        return Settings()
    except ValidationError as exc:
        raise ConfigurationError(describe_settings_error(exc)) from None
    except UnicodeError as exc:
        raise ConfigurationError(f".env: expected UTF-8 text ({exc})") from None
    except (SettingsError, OSError) as exc:  # a `.env` that can't be read or parsed
        raise ConfigurationError(f".env: {exc}") from None


def describe_settings_error(error: ValidationError) -> str:
    """Every mistake in `error`, one line in all: `NAME=value: expected ...[; reason]`, joined by "; "."""
    return "; ".join(_describe(details) for details in error.errors())


def _describe(details: Any) -> str:
    # A ValueError raised by one of the settings' own checks carries the reason, if there is more to say.
    reason = str(details["ctx"]["error"]) if details["type"] == "value_error" else ""
    reason = " ".join(reason.split())  # one line, whatever a library's message holds
    name = details["loc"][0] if details["loc"] else None
    if name not in Settings.model_fields:
        return reason or details["msg"]  # a rule across settings: its message names them itself
    field = Settings.model_fields[name]
    line = f"{name.upper()}={_shown(name, details['input'])}: expected {field.description}"
    return f"{line}; {reason}" if reason else line


def _shown(name: str, value: object) -> str:
    if _is_secret(name):
        return HIDDEN
    if isinstance(value, str) and (name in _URL_SETTINGS or "://" in value):
        # OLLAMA_URL may list several hosts: each one's credentials are its own.
        value = ",".join(_url_without_secrets(url) for url in value.split(","))
    # repr: quoted, with any line break escaped, so one line whatever was given.
    shown = repr(value)
    return shown if len(shown) <= MAX_SHOWN_VALUE else f"{shown[:MAX_SHOWN_VALUE]}…"


def _url_without_secrets(url: str) -> str:
    """`url` with its credentials shown as `(hidden)@`, a query or fragment as `?(hidden)` or `#(hidden)`."""
    scheme = _SCHEME.match(url)
    kept = scheme.group() if scheme else ""
    rest = url[len(kept) :]
    _, at, rest = rest.rpartition("@")
    if at:
        kept += f"{HIDDEN}@"
    cut = _QUERY_OR_FRAGMENT.search(rest)
    if cut is None:
        return kept + rest
    hidden = HIDDEN if rest[cut.end() :] else ""
    return f"{kept}{rest[: cut.start()]}{cut.group()}{hidden}"


def _is_secret(name: str) -> bool:
    annotation = Settings.model_fields[name].annotation
    return annotation is SecretStr or SecretStr in getattr(annotation, "__args__", ())
