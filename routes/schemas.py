"""Response and request shapes, for validation where the gateway owns the data and for `/docs`."""

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from pydantic.json_schema import JsonDict

from core.emails import EMAIL_MAX_LENGTH, checked_email
from core.password_rule import MAX_PASSWORD_LENGTH, MIN_PASSWORD_LENGTH, password_problem
from core.setting_checks import checked_upstream_url
from core.text import is_valid_text
from routes.credentials import MAX_FIELD_LENGTH

# Row ids are SQLite integers: a larger number in a path is refused (422), never handed to SQLite.
MAX_ROW_ID = 2**63 - 1
UserId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
KeyId = Annotated[int, Path(ge=1, le=MAX_ROW_ID)]
MODEL_NAME_MAX_LENGTH = 200


class ErrorBody(BaseModel):
    error: str = Field(examples=["model 'llama9' not found"])


class LoginRequest(BaseModel):
    email: str = Field(examples=["admin@local"], min_length=1, max_length=MAX_FIELD_LENGTH)
    password: str = Field(min_length=1, max_length=MAX_FIELD_LENGTH)


class TokenResponse(BaseModel):
    access_token: str
    token_type: str = "bearer"  # noqa: S105 -- the OAuth2 token type, not a secret
    expires_in: int = Field(description="Seconds until the token expires")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str = Field(examples=["user"])
    content: str = Field(examples=["Why is the sky blue?"])
    images: list[str] | None = Field(default=None, description="Base64-encoded images, for vision models")


class ChatRequest(BaseModel):
    """Ollama's `/api/chat` body, forwarded unchanged."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(examples=["llama3.2:1b"], pattern="[!-~]")
    messages: list[ChatMessage]
    stream: bool = Field(default=True, description="false: one JSON object instead of an NDJSON stream")
    options: dict[str, Any] | None = None
    format: Any = None
    tools: list[dict[str, Any]] | None = None
    keep_alive: str | int | None = None
    think: bool | str | None = None


class ModelList(BaseModel):
    models: list[dict[str, Any]]


class UploadResponse(BaseModel):
    filename: str
    download_path: str
    size: int
    content_type: str


class VersionResponse(BaseModel):
    version: str = Field(description="Ollama's version, as Ollama's own /api/version gives it")


class HealthResponse(BaseModel):
    status: str = Field(description="'ok', or 'degraded' when Ollama can't be reached")
    ollama_url: str = Field(description="the first of OLLAMA_URL's hosts: the ollama_* fields are its")
    ollama_reachable: bool
    ollama_version: str | None
    hosts: int = Field(description="Ollama hosts that take requests (enabled, not draining)")
    hosts_in_service: int = Field(description="of those, the ones not taken out of service after failing")


def _checked_text(value: str) -> str:
    if not is_valid_text(value):
        raise ValueError("not valid text (it holds a lone surrogate)")
    return value


def _checked_password(value: str) -> str:
    problem = password_problem(value)
    if problem:
        raise ValueError(f"the password {problem}")
    return value


def _checked_models(value: list[str] | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value]
    if any(not name or len(name) > MODEL_NAME_MAX_LENGTH or not is_valid_text(name) for name in names):
        raise ValueError("model names must be valid text, non-empty and at most 200 characters")
    return list(dict.fromkeys(names))


UserModels = list[str] | None
# What `_checked_models` accepts, said in the schema (a name is stripped, then 1 to 200 characters).
_MODEL_NAME_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "maxLength": MODEL_NAME_MAX_LENGTH,
    "pattern": "[!-~]",  # something besides whitespace, said in printable ASCII (see _EMAIL_SCHEMA)
}
NewUserModels = list[Annotated[str, WithJsonSchema(_MODEL_NAME_SCHEMA)]] | None
# Checked by `_checked_password` and `checked_email`; the rules are repeated here only for the schema.
_PASSWORD_SCHEMA: JsonDict = {"minLength": MIN_PASSWORD_LENGTH, "maxLength": MAX_PASSWORD_LENGTH}
# Printable ASCII only: the JSON schema's and Python's ideas of whitespace differ past ASCII, and the schema
# must never call valid an address the check refuses (it accepts more than the schema says, not less).
_EMAIL_SCHEMA: JsonDict = {"pattern": "^[!-~]+@[!-?A-~]+$", "maxLength": EMAIL_MAX_LENGTH}
MODELS_DESCRIPTION = "The models this user may use; null: every model"
MAX_CAP = 1_000_000
MAX_INFLIGHT_DESCRIPTION = (
    "Their requests running at once, at most (more wait in the gateway's queue); "
    "null: MAX_INFLIGHT_PER_USER; 0: no limit"
)
MAX_WAITING_DESCRIPTION = (
    "Their requests waiting at once, at most (more are answered 429); null: MAX_WAITING_PER_USER; 0: no limit"
)


QUOTA_DESCRIPTION = (
    "Limits per day or month (in TIME_ZONE) on tokens, slot-seconds and/or requests, each optional "
    "(null: no limit on that); the whole quota null: unlimited"
)


class Quota(BaseModel):
    """A quota (usage.quotas): beyond a limit, requests are answered 429 until the period resets."""

    model_config = ConfigDict(extra="forbid")

    period: Literal["day", "month"]
    # Strict: `true` is no count (lax pydantic would read it as a limit of 1).
    tokens: int | None = Field(
        default=None, ge=1, le=10**15, strict=True, description="prompt and completion tokens"
    )
    slot_seconds: float | None = Field(
        default=None,
        gt=0,
        le=10**12,
        allow_inf_nan=False,
        strict=True,
        description="seconds a slot worked for them",
    )
    requests: int | None = Field(
        default=None, ge=1, le=10**12, strict=True, description="requests sent to Ollama"
    )


# The shapes the API answers with are read from the stored records themselves (db.models).
class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    email: str
    role: Literal["admin", "user"]
    models: UserModels = Field(description=MODELS_DESCRIPTION)
    disabled: bool
    created_at: str
    max_inflight: int | None = Field(description=MAX_INFLIGHT_DESCRIPTION)
    max_waiting: int | None = Field(description=MAX_WAITING_DESCRIPTION)
    quota: Quota | None = Field(default=None, description=QUOTA_DESCRIPTION)


class NewUser(BaseModel):
    email: str = Field(examples=["ada@example.com"], json_schema_extra=_EMAIL_SCHEMA)
    password: str = Field(
        description="8 to 1024 characters, not a common password", json_schema_extra=_PASSWORD_SCHEMA
    )
    role: Literal["admin", "user"] = "user"
    models: NewUserModels = Field(default=None, description=MODELS_DESCRIPTION, examples=[["llama3.2:1b"]])

    _email = field_validator("email")(checked_email)
    _password = field_validator("password")(_checked_password)
    _models = field_validator("models")(_checked_models)


class UserPatch(BaseModel):
    """Only the fields sent change; `"models": null` lets the user use every model, `"max_inflight": null`
    and `"max_waiting": null` give them the settings' caps again."""

    role: Literal["admin", "user"] | None = None
    models: NewUserModels = Field(default=None, description=MODELS_DESCRIPTION)
    disabled: bool | None = None
    password: str | None = Field(default=None, json_schema_extra=_PASSWORD_SCHEMA)
    max_inflight: int | None = Field(default=None, ge=0, le=MAX_CAP, description=MAX_INFLIGHT_DESCRIPTION)
    max_waiting: int | None = Field(default=None, ge=0, le=MAX_CAP, description=MAX_WAITING_DESCRIPTION)
    quota: Quota | None = Field(default=None, description=QUOTA_DESCRIPTION)

    _password = field_validator("password")(
        lambda value: value if value is None else _checked_password(value)
    )
    _models = field_validator("models")(_checked_models)


class PasswordChange(BaseModel):
    # No password the rule allows is longer; a longer one is refused (422) before any hashing.
    current_password: str = Field(max_length=MAX_PASSWORD_LENGTH)
    new_password: str = Field(json_schema_extra=_PASSWORD_SCHEMA)

    _new_password = field_validator("new_password")(_checked_password)


KEY_PRIORITY_DESCRIPTION = (
    "batch: the key's requests to models wait behind everyone's interactive ones (scripts, bulk jobs); "
    "interactive: as a person's"
)


class NewKey(BaseModel):
    name: str = Field(min_length=1, max_length=100, examples=["nightly summariser"])
    expires_in_days: int | None = Field(default=None, ge=1, le=3650, description="null: never expires")
    priority: Literal["interactive", "batch"] = Field(
        default="interactive", description=KEY_PRIORITY_DESCRIPTION
    )

    _name = field_validator("name")(_checked_text)


class KeyInfo(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    prefix: str = Field(description="The key's first characters, to tell keys apart")
    created_at: str
    last_used_at: str | None
    expires_at: str | None
    priority: Literal["interactive", "batch"] = Field(description=KEY_PRIORITY_DESCRIPTION)
    quota: Quota | None = Field(default=None, description=QUOTA_DESCRIPTION)


class KeyPatch(BaseModel):
    """Only the fields sent change; `"quota": null` makes the key unlimited again (its owner's quota still
    counts)."""

    model_config = ConfigDict(extra="forbid")

    quota: Quota | None = Field(default=None, description=QUOTA_DESCRIPTION)


class CreatedKey(KeyInfo):
    key: str = Field(description="The full key: shown only this once")


class OwnedKeyInfo(KeyInfo):
    user_id: int
    email: str


class UploadInfo(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    filename: str
    download_path: str
    original_name: str
    size: int
    content_type: str
    created_at: str


# Ollama hosts (`/admin/hosts`). A name is what X-Ollama-Host carries: a header value, so printable ASCII.
HOST_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$"
MAX_HOST_SLOTS = 1024
HostId = Annotated[str, Path(min_length=1, max_length=64, examples=["h1"])]
# Checked by `_checked_host_url` (core.setting_checks, as OLLAMA_URL); the pattern, for the schema only, is a
# part of what the check accepts (see _EMAIL_SCHEMA): letters and digits, a single hyphen inside a label of at
# most 62 characters.
_LABEL = "[a-z0-9]{1,20}(-[a-z0-9]{1,20}){0,2}"
_HOST_URL_SCHEMA: JsonDict = {
    "pattern": f"^https?://([a-z0-9]+(:[a-z0-9]+)?@)?{_LABEL}(\\.{_LABEL}){{0,3}}(:[1-9][0-9]{{0,3}})?"
    f"(/[a-z0-9_-]{{1,20}}){{0,3}}$",
    "maxLength": 2048,
}
HOST_URL_EXAMPLE = "http://gpu-2.lan:11434"
HOST_URL_DESCRIPTION = (
    "Ollama's URL, http:// or https://, as in OLLAMA_URL; a user:password@ in it is sent to Ollama, never "
    "shown"
)
HostUrl = Annotated[str, Field(description=HOST_URL_DESCRIPTION, json_schema_extra=_HOST_URL_SCHEMA)]
SLOTS_DESCRIPTION = "Requests it runs at once per loaded model (its OLLAMA_NUM_PARALLEL); null: learned"


def _checked_host_url(value: str | None) -> str | None:
    if value is None:
        return None
    if len(value) > 2048:
        raise ValueError("expected at most 2048 characters")
    try:
        return checked_upstream_url(value)
    except ValueError as exc:  # its reasons never quote the URL: a password stays unsaid
        reason = f": {exc}" if str(exc) else ""
        raise ValueError(f"expected an http:// or https:// URL such as {HOST_URL_EXAMPLE}{reason}") from None


class NewHost(BaseModel):
    name: str = Field(pattern=HOST_NAME_PATTERN, examples=["gpu-2"], description="What X-Ollama-Host names")
    url: HostUrl = Field(examples=[HOST_URL_EXAMPLE])
    slots: int | None = Field(default=None, ge=1, le=MAX_HOST_SLOTS, description=SLOTS_DESCRIPTION)
    enabled: bool = True

    _url = field_validator("url")(_checked_host_url)


class HostPatch(BaseModel):
    """Only the fields sent change; `"slots": null` has the gateway learn them. Of a host from OLLAMA_URL,
    only `enabled` and `draining` change (until the next start)."""

    name: str | None = Field(default=None, pattern=HOST_NAME_PATTERN)
    url: HostUrl | None = None
    enabled: bool | None = None
    draining: bool | None = Field(default=None, description="true: no new work; what runs finishes")
    slots: int | None = Field(default=None, ge=1, le=MAX_HOST_SLOTS, description=SLOTS_DESCRIPTION)

    _url = field_validator("url")(_checked_host_url)


class ModelSlots(BaseModel):
    capacity: int | None = Field(description="Slots for this model; null: not known yet (not limited)")
    source: Literal["configured", "learned"] | None
    inflight: int = Field(description="Requests running there")
    waiting: int = Field(description="Requests waiting in the gateway for this model")


class HostOut(BaseModel):
    id: str = Field(examples=["h1"], description="env-1, ... for OLLAMA_URL's hosts; h1, ... for stored ones")
    name: str
    url: str = Field(description="Without credentials")
    source: Literal["environment", "stored"]
    enabled: bool
    draining: bool
    slots: int | None = Field(description="As set (OLLAMA_PARALLEL, or the host's own); null: learned")
    healthy: bool
    problem: str | None = Field(description="Why it was last taken out of service")
    models: list[str] | None = Field(description="What it holds; null: not checked yet")
    loaded: list[str]
    capacity: dict[str, ModelSlots] = Field(description="Per model loaded or running there")


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, all of which answer `{"error": ...}`."""
    return {status: {"model": ErrorBody} for status in statuses}


class UsageReport(BaseModel):
    """Sums per group; each row holds its grouping fields (`user` with its `email`, `key`, `model`, `host`,
    `day`) and the figures."""

    rows: list[dict[str, Any]] = Field(
        description="requests, prompt_tokens, completion_tokens, slot_seconds, and how many of the requests "
        "were cancelled, failed (errors) or have estimated figures"
    )
    totals: dict[str, Any]
    quota: dict[str, Any] | None = Field(
        default=None, description="/me/usage: your quota, what you used of it this period, and when it resets"
    )


# A date or a date-time in a query (the audit trail's and the usage reports' `since` and `until`), said in
# the schema: a part of what the checks accept only (as of host URLs), so that the schema never calls valid
# what a check refuses (2026-02-30).
_DAY = "20[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|1[0-9]|2[0-8])"
_TIME = "T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]Z"
MOMENT_SCHEMA = {"pattern": f"^{_DAY}({_TIME})?$"}

# The audit trail (`GET /admin/audit`).
AUDIT_ACTION_PATTERN = r"^[a-z0-9_-]+(\.[a-z0-9_-]*)?$"


class AuditEntryOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: str = Field(examples=["2026-05-01T12:00:00Z"])
    actor_id: int | None = Field(description="The user who acted; null: manage.py, the command line")
    actor: str = Field(description="Their email at the time, or manage.py", examples=["admin@example.com"])
    action: str = Field(examples=["user.update"])
    target: str | None = Field(description="What was acted on", examples=["user 3", "key 7", "host gpu-1"])
    details: dict[str, Any] | None = Field(
        description="What changed: the fields sent, with their new values (a secret only as changed or set)",
        examples=[{"role": "admin", "password": "changed"}],
    )
    address: str | None = Field(description="The client's address; null: manage.py")


class AuditPageOut(BaseModel):
    entries: list[AuditEntryOut] = Field(description="Newest first")
    next: int | None = Field(description="Pass it as `before` for the next page; null: there is none")
