"""Response and request shapes, for validation where the gateway owns the data and for `/docs`."""

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorBody(BaseModel):
    error: str = Field(examples=["model 'llama9' not found"])


class LoginRequest(BaseModel):
    email: str = Field(examples=["admin@local"])
    password: str


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
    model: str = Field(examples=["llama3.2:1b"])
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


class HealthResponse(BaseModel):
    status: str = Field(description="'ok', or 'degraded' when Ollama can't be reached")
    ollama_url: str
    ollama_reachable: bool
    ollama_version: str | None


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for error statuses, all of which answer `{"error": ...}`."""
    return {status: {"model": ErrorBody} for status in statuses}
