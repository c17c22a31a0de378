"""The gateway's view of Ollama: one connection pool for the process, with the gateway's timeouts.

Every upstream call goes through `Upstream`: the relay, the model list and the health probe. Its connection
pool (`upstream.http11`) has no limit on connections in use, since each open stream holds one for its whole
life. Timeouts are the gateway's own: a short connect timeout; while the request goes out, the idle timeout
for a write Ollama leaves unread; a long first-byte timeout from the end of the request (Ollama sends nothing
until the model is loaded); and the idle timeout between chunks, enforced by the relay.

What Ollama answers about the gateway itself is the gateway's failure, never the client's: a 401, 403 or 407
means Ollama, or a proxy in front of it, refused the gateway's own credentials (a client shown 401 would take
its own token for bad, and the web page would sign its user out), and a redirect (a proxy's login page,
Ollama's internal address) is not for clients to follow. Both are answered 502.
"""

import asyncio
import json
from collections.abc import AsyncIterable
from dataclasses import dataclass
from typing import Any

from yarl import URL

from core.errors import GatewayError
from upstream.http11 import (
    ConnectionPool,
    FirstByteTimeout,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResponse,
    WriteTimeout,
)

MAX_ERROR_BODY = 64 * 1024
MAX_JSON_BODY = 16 * 1024 * 1024
# Ollama, or a proxy in front of it, refusing the credentials in OLLAMA_URL (or their absence).
CREDENTIALS_REFUSED = frozenset({401, 403, 407})
# 304 answers a conditional request (the client's own validators reach Ollama); every other 3xx redirects.
NOT_MODIFIED = 304


class Unreachable(GatewayError):
    """Ollama could not be reached, or the connection failed before any answer: nothing was answered, so
    the request may go to another host (fleet)."""


@dataclass(frozen=True)
class UpstreamTimeouts:
    connect: float
    first_byte: float
    idle: float


def public_url(url: str) -> str:
    """The upstream URL without any user:password in it, fit to show to anyone."""
    parsed = URL(url)
    return str(parsed.with_user(None)) if parsed.user or parsed.password else url


def content_coding(response: UpstreamResponse) -> str | None:
    """The Content-Encoding of a body that is not sent as is (gzip, br, ...), or None."""
    value = response.header(b"content-encoding")
    if value is None:
        return None
    codings = [coding.strip() for coding in value.decode("latin-1").lower().split(",")]
    codings = [coding for coding in codings if coding and coding != "identity"]
    return ", ".join(codings) or None


class Upstream:
    def __init__(self, base_url: str, timeouts: UpstreamTimeouts) -> None:
        self.base_url = base_url.rstrip("/")
        self.public_url = public_url(self.base_url)
        self.timeouts = timeouts
        self._pool = ConnectionPool(
            self.base_url,
            connect_timeout=timeouts.connect,
            first_byte_timeout=timeouts.first_byte,
            write_timeout=timeouts.idle,
        )

    async def close(self) -> None:
        self._pool.close()

    def retire(self) -> None:
        """No new work will come: close each connection once its answer ends (what runs is not cut)."""
        self._pool.retire()

    async def send(
        self,
        method: str,
        path: str,
        *,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
        length: int | None = None,
    ) -> UpstreamResponse:
        """Send a request and wait for the response head. Raises 502 if Ollama can't be reached, answers
        nonsense, refuses the gateway's credentials or redirects; 504 if it sends nothing within the
        first-byte timeout of the request's end, or stops reading the request for the idle timeout."""
        try:
            response = await self._pool.request(method, path, headers or [], body, length)
        except FirstByteTimeout:
            raise GatewayError(
                504,
                f"Ollama sent nothing within {self.timeouts.first_byte:g} s (upstream first-byte timeout)",
            ) from None
        except WriteTimeout:
            raise GatewayError(
                504,
                f"Ollama stopped reading the request for {self.timeouts.idle:g} s (upstream idle timeout)",
            ) from None
        except UpstreamProtocolError as exc:
            raise GatewayError(502, f"bad answer from Ollama at {self.public_url}: {exc}") from None
        except UpstreamError as exc:
            raise Unreachable(502, f"cannot reach Ollama at {self.public_url}: {exc}") from None
        refusal = self._refusal(response)
        if refusal is not None:
            response.close()
            raise refusal
        return response

    def _refusal(self, response: UpstreamResponse) -> GatewayError | None:
        """Why an answer about the gateway itself must not reach the client as it is, if it must not."""
        status = response.status
        if status in CREDENTIALS_REFUSED:
            return GatewayError(
                502,
                f"Ollama at {self.public_url} (or a proxy in front of it) refused the gateway's credentials "
                f"({status}): your own token is fine; the gateway's operator must check OLLAMA_URL",
            )
        if 300 <= status < 400 and status != NOT_MODIFIED:
            return GatewayError(
                502,
                f"Ollama at {self.public_url} (or a proxy in front of it) answered with a redirect "
                f"({status}), which the gateway does not follow: the gateway's operator must check "
                "OLLAMA_URL",
            )
        return None

    async def fetch_json(self, method: str, path: str) -> Any:
        """A small non-streaming call whose JSON answer the gateway reads itself."""
        response = await self.send(method, path)
        try:
            if response.status >= 400:
                raise await error_from(response, self.timeouts.idle)
            coding = content_coding(response)
            if coding is not None:
                raise GatewayError(502, self.compressed_message(coding, "answer"))
            async with asyncio.timeout(self.timeouts.idle):
                return json.loads(await response.read(MAX_JSON_BODY))
        except (ValueError, UpstreamError, TimeoutError):
            raise GatewayError(502, f"Ollama at {self.public_url} sent an unreadable answer") from None
        finally:
            response.release()

    def compressed_message(self, coding: str, what: str) -> str:
        return (
            f"Ollama at {self.public_url} (or a proxy in front of it) sent its {what} compressed ({coding}) "
            "although the gateway asks for none, and the gateway can't read it: turn compression off "
            "between the gateway and Ollama"
        )


async def error_from(response: UpstreamResponse, read_timeout: float) -> GatewayError:
    """Ollama's own error, with its status and message, as the gateway's error."""
    raw = b""
    if content_coding(response) is None:  # a compressed body would be noise: the status says enough
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
