"""The gateway's settings, read from the environment and `.env`.

Names match the original backend's (`OLLAMA_URL`, `SECRET_KEY`, `ADMIN_EMAIL`, ...) so existing deployments
keep working. Secrets have no default that works: a missing `SECRET_KEY` or `ADMIN_PASSWORD` is generated on
first start (see `auth.bootstrap`), never guessed.
"""

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from core.client_address import IPNetwork, parse_networks

MIB = 1024 * 1024


class ConfigurationError(Exception):
    """A setting (or the way the gateway was started) that can't work: said in one line, before serving."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env", env_file_encoding="utf-8", extra="ignore", env_ignore_empty=True
    )

    ollama_url: str = "http://localhost:11434"
    secret_key: SecretStr | None = None
    admin_email: str = "admin@local"
    admin_password: SecretStr | None = None
    access_token_expire_minutes: int = Field(default=1440, gt=0)
    data_dir: Path = Path("./data")
    max_upload_mb: float = Field(default=25, gt=0)
    # JSON bodies on /chat carry base64 images, so several MB must pass; this only stops absurd bodies.
    max_request_mb: float = Field(default=64, gt=0)
    cors_origins: Annotated[list[str], NoDecode] = []
    # Proxies (addresses or CIDR networks) whose X-Forwarded-For is believed; none by default, since any
    # client can send the header (see core.client_address).
    trusted_proxies: Annotated[tuple[IPNetwork, ...], NoDecode] = ()

    # Sign-in limits (auth.throttle): failed password checks allowed within the window per (email, address)
    # pair, per address, and per email across all addresses (larger than the pair's: auth.bootstrap refuses
    # less); an address the email signed in from before is held to its pair's limit only. Every attempt,
    # successes too, per address per minute; and password checks running at once per address.
    login_window_minutes: float = Field(default=15, gt=0)
    login_max_failures: int = Field(default=5, gt=0)
    login_max_failures_per_address: int = Field(default=20, gt=0)
    login_max_failures_per_email: int = Field(default=50, gt=0)
    login_max_attempts_per_address: int = Field(default=30, gt=0)
    login_max_concurrent_per_address: int = Field(default=2, gt=0)

    # Ollama sends no byte until the model is loaded and the prompt evaluated, which can take minutes
    # on a cold start: the first-byte timeout must allow for that, the idle timeout only for gaps between
    # tokens once generation runs.
    upstream_connect_timeout: float = Field(default=10, gt=0)
    upstream_first_byte_timeout: float = Field(default=600, gt=0)
    upstream_idle_timeout: float = Field(default=300, gt=0)

    # A client must send its whole request head (request line and headers) within this many seconds of
    # connecting, or of starting its next request on a kept-alive connection; uvicorn itself never gives up
    # on a client that connects and sends nothing, or trickles its headers a byte at a time.
    request_header_timeout: float = Field(default=20, gt=0)
    # The same for a request body: seconds the gateway waits for one, plus a second per 16 KB received, so
    # an upload at a reasonable speed always finishes and a client trickling bytes is cut off
    # (core.server).
    request_body_timeout: float = Field(default=60, gt=0)
    # On SIGTERM, requests already running (streams included) get this long to finish; then they are cut.
    graceful_shutdown_seconds: float = Field(default=30, ge=0)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip().rstrip("/") for origin in value.split(",") if origin.strip()]
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _parse_proxies(cls, value: object) -> object:
        if isinstance(value, str):
            return parse_networks(value.split(","))
        return value

    @field_validator("ollama_url")
    @classmethod
    def _strip_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

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
