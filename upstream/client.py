"""The gateway's view of Ollama: one connection pool for the process, with the gateway's timeouts.

Every upstream call goes through `Upstream`: the relay, the model list and the health probe. Its connection
pool (`upstream.http11`) has no size limit, since each open stream holds one connection for its whole life.
Timeouts are the gateway's own: a short connect timeout, a long first-byte timeout (Ollama sends nothing until
the model is loaded), and an idle timeout between chunks, enforced by the relay.
"""

import asyncio
import json
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

from yarl import URL

from core.errors import GatewayError
from upstream.http11 import ConnectionPool, UpstreamError, UpstreamResponse

MAX_ERROR_BODY = 64 * 1024
MAX_JSON_BODY = 16 * 1024 * 1024


@dataclass(frozen=True)
class UpstreamTimeouts:
    connect: float
    first_byte: float
    idle: float


def public_url(url: str) -> str:
    """The upstream URL without any user:password in it, fit to show to anyone."""
    parsed = URL(url)
    return str(parsed.with_user(None)) if parsed.user or parsed.password else url


class Upstream:
    def __init__(self, base_url: str, timeouts: UpstreamTimeouts) -> None:
        self.base_url = base_url.rstrip("/")
        self.public_url = public_url(self.base_url)
        self.timeouts = timeouts
        self._pool = ConnectionPool(self.base_url, timeouts.connect)

    async def close(self) -> None:
        self._pool.close()

    async def send(
        self,
        method: str,
        path: str,
        *,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
        length: int | None = None,
    ) -> UpstreamResponse:
        """Send a request and wait for the response head. Raises 502 if Ollama can't be reached or answers
        nonsense, 504 if it sends nothing within the first-byte timeout."""
        try:
            async with asyncio.timeout(self.timeouts.first_byte):
                return await self._pool.request(method, path, headers or [], body, length)
        except UpstreamError as exc:
            raise GatewayError(502, f"cannot reach Ollama at {self.public_url}: {exc}") from None
        except TimeoutError:
            raise GatewayError(
                504,
                f"Ollama sent nothing within {self.timeouts.first_byte:g} s (upstream first-byte timeout)",
            ) from None

    async def fetch_json(self, method: str, path: str) -> Any:
        """A small non-streaming call whose JSON answer the gateway reads itself."""
        response = await self.send(method, path)
        try:
            if response.status >= 400:
                raise await error_from(response, self.timeouts.idle)
            async with asyncio.timeout(self.timeouts.idle):
                return json.loads(await response.read(MAX_JSON_BODY))
        except (ValueError, UpstreamError, TimeoutError):
            raise GatewayError(502, f"Ollama at {self.public_url} sent an unreadable answer") from None
        finally:
            response.release()


async def error_from(response: UpstreamResponse, read_timeout: float) -> GatewayError:
    """Ollama's own error, with its status and message, as the gateway's error."""
    try:
        async with asyncio.timeout(read_timeout):
            raw = await response.read(MAX_ERROR_BODY)
    except (UpstreamError, TimeoutError):
        raw = b""
    message = raw.decode("utf-8", "replace").strip()
    try:
        error = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        error = None  # Gin's own 404/405 pages are plain text: the text is the message.
    if isinstance(error, dict):
        error = error.get("message")  # on /v1, Ollama answers OpenAI's {"error": {"message": ...}}
    if isinstance(error, str):
        message = error
    return GatewayError(response.status, message or response.reason or f"Ollama answered {response.status}")
