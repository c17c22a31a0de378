"""A mistake in the settings, said in one line: the setting as it is written in the environment, the value
given, and what it expects (issue 10, item 3). pydantic's own report takes several lines per mistake, and a
mistake reached by `uvicorn main:app` came with 57 lines of traceback.

    OLLAMA_URL='localhost:11434': expected a URL starting with http:// or https://, such as ...

Secrets are never repeated: their value shows as `(hidden)`.
"""

import re
from typing import Any

from pydantic import SecretStr, ValidationError
from pydantic_settings import SettingsError

from core.settings import ConfigurationError, Settings

HIDDEN = "(hidden)"
# A value longer than this is cut: the line must stay readable.
MAX_SHOWN_VALUE = 120
# The password in a URL's user:password@ (OLLAMA_URL's credentials are used, never shown), even in a URL too
# broken to parse.
_URL_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@")


def configuration_error_line(error: ConfigurationError) -> str:
    """What the gateway prints, alone, when it can't start because of `error`."""
    return f"ollama-gateway: configuration error: {error}"


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
    # repr: quoted, with any line break escaped, so one line whatever was given.
    shown = repr(_URL_PASSWORD.sub(rf"\1{HIDDEN}@", value) if isinstance(value, str) else value)
    return shown if len(shown) <= MAX_SHOWN_VALUE else f"{shown[:MAX_SHOWN_VALUE]}…"


def _is_secret(name: str) -> bool:
    annotation = Settings.model_fields[name].annotation
    return annotation is SecretStr or SecretStr in getattr(annotation, "__args__", ())
