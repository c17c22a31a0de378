"""The one upstream client of the process: an aiohttp session with the gateway's timeouts.

Why aiohttp and not httpx: measured on this project's machines, httpx's AsyncClient collapses under
hundreds of concurrent streams (pool locking and per-chunk cost, encode/httpx#3215): about 5x nginx's wall
time for 400 streams, against 1.3x for aiohttp. See README, "Performance".

Each open stream holds one upstream connection for its whole life, so the pool has no limit (aiohttp's
default of 100 would make the 101st stream wait). Timeouts are the gateway's own: a short connect timeout,
a long first-byte timeout (Ollama sends nothing until the model is loaded), and an idle timeout between
chunks, enforced by the relay.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from core.errors import GatewayError

MAX_ERROR_BODY = 64 * 1024
# Bodies above this go out in slices, each written when the socket has room, instead of in one write that
# copies megabytes (base64 images) into the transport at once.
LARGE_BODY = 1024 * 1024
BODY_SLICE = 256 * 1024


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
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    def _url(self, path: str) -> URL:
        # A handful of distinct paths, parsed once each rather than on every request.
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + path)
        return url

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeouts.connect),
            # Bytes are relayed as Ollama sent them; nothing is decoded, stored or added.
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("Accept-Encoding",),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(
        self, method: str, path: str, *, headers: Any = None, body: Any = None
    ) -> aiohttp.ClientResponse:
        """Send a request and wait for the response head. Raises 502 if Ollama can't be reached, 504 if it
        sends nothing within the first-byte timeout."""
        assert self._session is not None, "Upstream.start() was not awaited"
        if isinstance(body, bytes) and len(body) > LARGE_BODY:
            headers = [*(headers or ()), ("Content-Length", str(len(body)))]
            body = _in_slices(body)
        try:
            async with asyncio.timeout(self.timeouts.first_byte):
                return await self._session.request(
                    method, self._url(path), headers=headers, data=body, allow_redirects=False
                )
        except aiohttp.ClientError as exc:
            raise GatewayError(502, f"cannot reach Ollama at {self.public_url}: {_reason(exc)}") from None
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
                return json.loads(await response.read())
        except (ValueError, aiohttp.ClientError, TimeoutError):
            raise GatewayError(502, f"Ollama at {self.public_url} sent an unreadable answer") from None
        finally:
            response.close()


async def _in_slices(body: bytes) -> AsyncIterator[memoryview]:
    view = memoryview(body)
    for start in range(0, len(view), BODY_SLICE):
        yield view[start : start + BODY_SLICE]


def _reason(exc: aiohttp.ClientError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return exc.os_error.strerror or type(exc.os_error).__name__
    return str(exc) or type(exc).__name__


async def error_from(response: aiohttp.ClientResponse, read_timeout: float) -> GatewayError:
    """Ollama's own error, with its status and message, as the gateway's error."""
    try:
        async with asyncio.timeout(read_timeout):
            raw = await response.content.read(MAX_ERROR_BODY)
    except (aiohttp.ClientError, TimeoutError):
        raw = b""
    message = raw.decode("utf-8", "replace").strip()
    try:
        decoded = json.loads(raw)
        if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
            message = decoded["error"]
    except ValueError:
        pass  # Gin's own 404/405 pages are plain text: the text is the message.
    return GatewayError(response.status, message or response.reason or f"Ollama answered {response.status}")
