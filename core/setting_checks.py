"""Checks for the settings whose type says too little: the upstream URL, the database and Redis URLs, the
Redis key prefix, browser origins, the address to listen on and the data folder.

Each returns the value to use, or raises ValueError: bare when the setting's own description of what it
expects says all there is to say, with a short reason when there is more (which part is wrong). The
settings error (`core.settings_errors`) puts both in one line.
"""

import ipaddress
import re
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from yarl import URL

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens.
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
# An origin as browsers send it: scheme://host[:port], nothing after it (RFC 6454).
_ORIGIN = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<host>\[[0-9a-f:.]+\]|[^\s/?#@:\[\]]+)(:\d{1,5})?")
ANY_ORIGIN = "*"
# A quoted part of a library's message, from the first quote to the last (a password may hold a quote).
_QUOTED = re.compile(r" ?'.*'")


def checked_upstream_url(value: str) -> str:
    """OLLAMA_URL: http(s)://[user:password@]host[:port][/base/path], with its trailing slash taken off.

    The relay appends `/api/...` to the path, so a base path (Ollama behind a reverse proxy at `/ollama`)
    works; a query or fragment would be dropped silently, so it is refused. Credentials are sent as Basic
    auth (`upstream.http11`)."""
    value = value.strip()
    try:
        url = URL(value)
    except ValueError as exc:
        # yarl quotes the whole authority, password included, when NFKC turns one of its characters into a
        # delimiter (a fullwidth slash, U+FF0F, into `/`): the reason is said without what it quotes.
        reason = _QUOTED.sub("", str(exc).lower().removeprefix("invalid url: "))
        raise ValueError(reason) from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise ValueError
    if any(char.isspace() for char in url.raw_host):
        raise ValueError("the host has a space in it")
    try:
        # Decoded and encoded again here, as the connection pool and the resolver will: an `xn--` label may
        # not decode, a label of more than 63 characters does not encode.
        (url.host or "").encode("idna")
    except UnicodeError:
        raise ValueError("the host is not a valid domain name") from None
    if url.explicit_port == 0:  # 0 is falsy: `if url.explicit_port` let it through
        raise ValueError("port 0 is not a port Ollama can listen on")
    if url.query_string or url.fragment or value.endswith(("?", "#")):
        raise ValueError("nothing may follow the path (no ?query or #fragment)")
    return value.rstrip("/")


def checked_origins(value: str) -> list[str]:
    """CORS_ORIGINS: comma-separated origins, each scheme://host[:port]; `*` alone allows any origin (the
    gateway's tokens travel in a header, never a cookie, so that exposes nothing by itself)."""
    # Browsers send scheme and host in lower case, and CORS compares origins exactly.
    origins = [origin.strip().rstrip("/").lower() for origin in value.split(",") if origin.strip()]
    if origins == [ANY_ORIGIN]:
        return origins
    for origin in origins:
        match = _ORIGIN.fullmatch(origin)
        port = match.group(3) if match else None
        if match is None or (port is not None and not 0 < int(port[1:]) <= 65535):
            raise ValueError(f"{origin!r} is not an origin")
    return origins


def checked_listen_host(value: str) -> str:
    """HOST: an IP address or a host name (resolved when the gateway binds)."""
    value = value.strip()
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if len(value) > 253 or not _HOST_NAME.fullmatch(value):
            raise ValueError from None
    return value


def checked_data_folder(value: Path) -> Path:
    """DATA_DIR: a folder, created at start if missing; nothing is created here."""
    if "\0" in str(value):
        raise ValueError("it holds a NUL character")
    if value.exists() and not value.is_dir():
        raise ValueError("that is a file, not a folder")
    existing = next((folder for folder in value.absolute().parents if folder.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ValueError(f"{existing} is a file, not a folder")
    return value


POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")


def checked_database_url(value: str | None) -> str | None:
    """DATABASE_URL: postgresql://[user[:password]@]host[:port]/database[?options], or nothing (SQLite in
    DATA_DIR). Only the form is checked here; a server that can't be reached is said at start-up."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        url = URL(value)
    except ValueError as exc:
        raise ValueError(str(exc).lower().removeprefix("invalid url: ")) from None
    if url.scheme not in POSTGRES_SCHEMES:
        raise ValueError
    if not url.path.strip("/"):
        raise ValueError("it names no database (postgresql://host/database)")
    if url.fragment:
        raise ValueError("nothing may follow the options (no #fragment)")
    return value


REDIS_SCHEMES = ("redis", "rediss", "unix")
# Printable and free of spaces, so a key reads back the same in redis-cli and in logs.
_REDIS_PREFIX = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def checked_redis_url(value: str | None) -> str | None:
    """REDIS_URL: redis://[user:password@]host[:port][/db], rediss:// for TLS, or unix:///path/to/socket, or
    nothing (one process, nothing shared). Only the form is checked here: a Redis that does not answer is a
    degraded mode at run time (`cluster.redis_link`), not a reason to refuse to start."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        url = URL(value)
    except ValueError as exc:
        raise ValueError(_QUOTED.sub("", str(exc).lower().removeprefix("invalid url: "))) from None
    if url.scheme not in REDIS_SCHEMES:
        raise ValueError
    if url.fragment:
        raise ValueError("nothing may follow the options (no #fragment)")
    if url.scheme == "unix":
        if not url.path.strip("/"):
            raise ValueError("it names no socket (unix:///path/to/redis.sock)")
        return value
    if not url.raw_host:
        raise ValueError("it names no host (redis://host:6379)")
    if url.explicit_port == 0:
        raise ValueError("port 0 is not a port Redis can listen on")
    database = url.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"the path must be a database number, such as /0, not /{database}")
    return value


def checked_redis_prefix(value: str) -> str:
    """REDIS_PREFIX: what every key the gateway writes in Redis starts with, so several gateways (or other
    programs) can share one Redis."""
    if not _REDIS_PREFIX.fullmatch(value):
        raise ValueError
    return value


def checked_time_zone(value: str) -> ZoneInfo:
    """An IANA time zone name this machine knows (its tz database, or Python's tzdata)."""
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None
