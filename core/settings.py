"""The gateway's settings, read from the environment and `.env`.

Names match the original backend's (`OLLAMA_URL`, `SECRET_KEY`, `ADMIN_EMAIL`, ...) so existing deployments
keep working. Secrets have no default that works: a missing `SECRET_KEY` or `ADMIN_PASSWORD` is generated on
first start (see `auth.bootstrap`), never guessed.

Every setting is checked when the settings are read, each field's `description` saying in plain English
what it expects: `core.settings_errors` turns any mistake into one line that names the setting, its value
and that expectation (issue 10, item 3). Counts are whole numbers; durations and sizes may be fractions.
"""

from pathlib import Path
from typing import Annotated, Self

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.client_address import IPNetwork, parse_networks
from core.emails import checked_email
from core.password_rule import password_problem
from core.setting_checks import (
    checked_data_folder,
    checked_database_url,
    checked_listen_host,
    checked_origins,
    checked_redis_prefix,
    checked_redis_url,
    checked_time_zone,
    checked_upstream_url,
)

MIB = 1024 * 1024
MIN_SECRET_KEY_LENGTH = 32
MIN_METRICS_TOKEN_LENGTH = 32
LOG_FORMATS = ("text", "json")
QUOTA_MODES_WITHOUT_REDIS = ("closed", "open")

_SECONDS = "a number of seconds greater than 0"
_COUNT = "a whole number of at least 1"
_COUNT_OR_ZERO = "a whole number, 0 for no limit"


class ConfigurationError(Exception):
    """A setting (or the way the gateway was started) that can't work: said in one line, before serving."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        env_ignore_empty=True,
        # Defaults are checked too: a file named `data` where DATA_DIR's default points is a mistake.
        validate_default=True,
    )

    # One Ollama host or several, comma-separated (a comma inside a password is written %2C).
    ollama_url: str = Field(
        default="http://localhost:11434",
        description="one URL starting with http:// or https://, such as http://localhost:11434, or several "
        "separated by commas",
    )
    # Requests each of OLLAMA_URL's hosts runs at once per loaded model (its OLLAMA_NUM_PARALLEL). Unset, the
    # gateway learns it from Ollama's timings (fleet.learning).
    ollama_parallel: int | None = Field(default=None, gt=0, description=_COUNT + ", or no value to learn it")
    # Seconds between checks of every host (its models, the loaded ones, whether it answers).
    host_check_seconds: float = Field(default=10, gt=0, allow_inf_nan=False, description=_SECONDS)
    secret_key: SecretStr | None = Field(
        default=None,
        description=f"at least {MIN_SECRET_KEY_LENGTH} characters, or no value to have one generated",
    )
    admin_email: str = Field(default="admin@local", description="an email address, such as admin@example.com")
    admin_password: SecretStr | None = Field(
        default=None,
        description="8 to 1024 characters and not a common password, or no value to have one generated",
    )
    access_token_expire_minutes: int = Field(
        default=1440, gt=0, description="a whole number of minutes, at least 1"
    )
    data_dir: Path = Field(default=Path("./data"), description="a folder (created if missing)")
    # Unset: SQLite in DATA_DIR. Set: every replica shares that Postgres database (db.engine).
    database_url: str | None = Field(
        default=None,
        description="a postgresql:// URL naming a database, such as "
        "postgresql://gateway@db.internal/gateway, or no value for SQLite in DATA_DIR",
    )
    # Set: the replicas share short-lived state through this Redis: the fair queue and the slots (`cluster/`).
    # Unset: one process, nothing shared.
    redis_url: str | None = Field(
        default=None,
        description="a redis://, rediss:// or unix:// URL, such as redis://cache.internal:6379/0, or no "
        "value for one gateway process sharing nothing",
    )
    # The start of every key the gateway writes there: gateways (or other programs) sharing one Redis keep
    # apart with prefixes of their own.
    redis_prefix: str = Field(
        default="gateway:",
        description="1 to 64 letters, digits or .:_- characters, such as gateway:",
    )
    # A slot lease not renewed for this long is free again: how long a replica killed mid-request (kill -9)
    # keeps its slots. Held leases are renewed every third of it. Seconds, not minutes (issue 14); under a
    # second, a busy replica's renewal could come too late.
    lease_seconds: float = Field(
        default=10, ge=1, le=60, allow_inf_nan=False, description="a number of seconds from 1 to 60"
    )
    # What quotas do while REDIS_URL's Redis does not answer (usage.quotas): `closed` refuses the model calls
    # of people and keys with a quota (503), `open` holds them against each replica's own count. Closed by
    # default: a quota is a budget the operator set, and open lets N replicas spend up to N of it.
    quotas_without_redis: str = Field(default="closed", description="closed or open")
    max_upload_mb: float = Field(
        default=25, gt=0, allow_inf_nan=False, description="a number of MiB greater than 0"
    )
    # JSON bodies on /chat carry base64 images, so several MB must pass; this only stops absurd bodies.
    max_request_mb: float = Field(
        default=64, gt=0, allow_inf_nan=False, description="a number of MiB greater than 0"
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default=[],
        description="comma-separated browser origins (scheme://host[:port]), such as "
        "https://chat.example.com, or * for any",
    )
    # Proxies (addresses or CIDR networks) whose X-Forwarded-For is believed; none by default, since any
    # client can send the header (see core.client_address).
    trusted_proxies: Annotated[tuple[IPNetwork, ...], NoDecode] = Field(
        default=(), description="comma-separated IP addresses or networks, such as 127.0.0.1 or 10.0.0.0/8"
    )

    # Sign-in limits (auth.throttle): failed password checks allowed within the window per (email, address)
    # pair, per address, and per email across all addresses (larger than the pair's: see
    # `_email_limit_above_pair_limit`); an address the email signed in from before is held to its pair's
    # limit only. Every attempt, successes too, per address per minute; and password checks running at once
    # per address.
    login_window_minutes: float = Field(
        default=15, gt=0, allow_inf_nan=False, description="a number of minutes greater than 0"
    )
    login_max_failures: int = Field(default=5, gt=0, description=_COUNT)
    login_max_failures_per_address: int = Field(default=20, gt=0, description=_COUNT)
    login_max_failures_per_email: int = Field(default=50, gt=0, description=_COUNT)
    login_max_attempts_per_address: int = Field(default=30, gt=0, description=_COUNT)
    login_max_concurrent_per_address: int = Field(default=2, gt=0, description=_COUNT)

    # Ollama sends no byte until the model is loaded and the prompt evaluated, which can take minutes
    # on a cold start: the first-byte timeout must allow for that, the idle timeout only for gaps between
    # tokens once generation runs.
    upstream_connect_timeout: float = Field(default=10, gt=0, allow_inf_nan=False, description=_SECONDS)
    upstream_first_byte_timeout: float = Field(default=600, gt=0, allow_inf_nan=False, description=_SECONDS)
    upstream_idle_timeout: float = Field(default=300, gt=0, allow_inf_nan=False, description=_SECONDS)

    # A client must send its whole request head (request line and headers) within this many seconds of
    # connecting, or of starting its next request on a kept-alive connection; uvicorn itself never gives up
    # on a client that connects and sends nothing, or trickles its headers a byte at a time.
    request_header_timeout: float = Field(default=20, gt=0, allow_inf_nan=False, description=_SECONDS)
    # The same for a request body: seconds the gateway waits for one, plus a second per 16 KB received, so
    # an upload at a reasonable speed always finishes and a client trickling bytes is cut off
    # (core.server).
    request_body_timeout: float = Field(default=60, gt=0, allow_inf_nan=False, description=_SECONDS)
    # The fair queue (fleet.scheduler): seconds a request may wait for a slot, by band; requests one person
    # (or one API key) may have waiting, and running (0: no limit). Past the waiting limit: 429.
    queue_timeout_interactive: float = Field(default=120, gt=0, allow_inf_nan=False, description=_SECONDS)
    queue_timeout_batch: float = Field(default=1800, gt=0, allow_inf_nan=False, description=_SECONDS)
    max_waiting_per_user: int = Field(default=64, ge=0, description=_COUNT_OR_ZERO)
    max_inflight_per_user: int = Field(default=0, ge=0, description=_COUNT_OR_ZERO)
    max_waiting_per_key: int = Field(default=0, ge=0, description=_COUNT_OR_ZERO)
    max_inflight_per_key: int = Field(default=0, ge=0, description=_COUNT_OR_ZERO)
    # The time zone quotas' days and months and the usage reports' days are counted in (an IANA name).
    time_zone: str = Field(default="UTC", description="a time zone name, such as UTC or Europe/Paris")

    # On SIGTERM, requests already running (streams included) get this long to finish; then they are cut.
    graceful_shutdown_seconds: float = Field(
        default=30, ge=0, allow_inf_nan=False, description="a number of seconds, 0 or more"
    )

    # The access log's lines (observe.access_log): key=value text, or one JSON object per line.
    log_format: str = Field(default="text", description="text or json")
    # A bearer token Prometheus may read GET /metrics with (admins always may). Unset: admins only.
    metrics_token: SecretStr | None = Field(
        default=None,
        description=f"at least {MIN_METRICS_TOKEN_LENGTH} characters with no spaces, or no value for "
        "admins only",
    )

    host: str = Field(
        default="127.0.0.1",
        description="an IP address or host name to listen on, such as 127.0.0.1 or 0.0.0.0",
    )
    port: int = Field(default=8000, ge=1, le=65535, description="a TCP port, 1 to 65535")

    @field_validator("ollama_url")
    @classmethod
    def _check_ollama_url(cls, value: str) -> str:
        urls = [checked_upstream_url(url) for url in value.split(",") if url.strip()]
        if not urls:
            raise ValueError
        return ",".join(urls)

    @field_validator("time_zone")
    @classmethod
    def _check_time_zone(cls, value: str) -> str:
        checked_time_zone(value)
        return value

    @field_validator("secret_key")
    @classmethod
    def _check_secret_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_SECRET_KEY_LENGTH:
            raise ValueError  # how long it is would be a hint about a secret
        return value

    @field_validator("log_format")
    @classmethod
    def _check_log_format(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in LOG_FORMATS:
            raise ValueError
        return value

    @field_validator("quotas_without_redis")
    @classmethod
    def _check_quotas_without_redis(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in QUOTA_MODES_WITHOUT_REDIS:
            raise ValueError
        return value

    @field_validator("metrics_token")
    @classmethod
    def _check_metrics_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Compared with what a client sends in a header: spaces or control characters could never match.
        token = value.get_secret_value() if value is not None else None
        if token is not None and (
            len(token) < MIN_METRICS_TOKEN_LENGTH
            or not token.isascii()
            or not token.isprintable()
            or " " in token
        ):
            raise ValueError  # what is wrong with it would be a hint about a secret
        return value

    @field_validator("admin_email")
    @classmethod
    def _check_admin_email(cls, value: str) -> str:
        try:
            return checked_email(value)  # the rule of POST /admin/users and manage.py create-user
        except ValueError:
            raise ValueError from None  # "expected an email address" says it

    @field_validator("admin_password")
    @classmethod
    def _check_admin_password(cls, value: SecretStr | None) -> SecretStr | None:
        problem = None if value is None else password_problem(value.get_secret_value())
        if problem:
            raise ValueError(f"it {problem}")
        return value

    @field_validator("data_dir")
    @classmethod
    def _check_data_dir(cls, value: Path) -> Path:
        return checked_data_folder(value)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        return checked_database_url(value)

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        return checked_redis_url(value)

    @field_validator("redis_prefix")
    @classmethod
    def _check_redis_prefix(cls, value: str) -> str:
        return checked_redis_prefix(value)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        return checked_origins(value) if isinstance(value, str) else value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_networks(value.split(","))
        return value

    @field_validator("host")
    @classmethod
    def _check_host(cls, value: str) -> str:
        return checked_listen_host(value)

    @model_validator(mode="after")
    def _email_limit_above_pair_limit(self) -> Self:
        # One address adds at most its pair limit to an email's count: only a larger email limit keeps a
        # stranger at one address from locking a person out everywhere (auth.throttle).
        if self.login_max_failures_per_email <= self.login_max_failures:
            raise ValueError(
                f"LOGIN_MAX_FAILURES_PER_EMAIL={self.login_max_failures_per_email}: expected a number larger "
                f"than LOGIN_MAX_FAILURES ({self.login_max_failures})"
            )
        return self

    @property
    def ollama_urls(self) -> list[str]:
        return self.ollama_url.split(",")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * MIB)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * MIB)

    @property
    def database_path(self) -> Path:
        return self.data_dir / "gateway.sqlite3"

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"
