"""The gateway process's one client to Redis (REDIS_URL), and whether Redis answers: `up` or `degraded`.

Replicas share short-lived state through Redis (issue 14). Redis can stop answering; the gateway must then
neither hang, nor crash, nor carry on silently as if the shared limits still held. So every call goes
through `RedisLink.call`, and its outcome is the link's health:

- The first failure turns the link `degraded`: one warning with the reason, `gateway_redis_degraded_total`
  counts it, `gateway_redis_up` reads 0. Later failures say nothing more (a log line per request would bury
  the one that matters).
- The first success after that turns it `up` again, with one line: no restart needed. While degraded,
  `watch` pings Redis every `check_seconds`, so recovery is noticed even when nobody else calls.
- A caller gets `RedisUnavailable`, never a redis-py exception, and decides itself what its degraded mode
  is (the slot leases' caller: local slots; issue 14 says what each piece does).

Timeouts are short: Redis answers in well under a millisecond on a LAN, and a request must not wait seconds
to learn that Redis is gone. One retry, without backoff: after a Redis restart, a connection the pool kept
fails once and is replaced, without turning the link degraded. An unreachable Redis therefore fails in at
most twice the connect timeout (0.5 s), a refused connection at once.

The URL's credentials are never logged: Redis is named by its scheme, host, port and database, and a
reason a library gives is cleared of the password before it is logged.

The metrics exist only in a process with a link (REDIS_URL set): a gateway without Redis shows no
`gateway_redis_up` at 0 to alarm on.
"""

import asyncio
import logging
from collections.abc import Awaitable
from contextlib import suppress
from typing import Literal, TypeVar
from urllib.parse import unquote

from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from yarl import URL

logger = logging.getLogger("gateway.redis")

T = TypeVar("T")
Health = Literal["up", "degraded"]
UP: Health = "up"
DEGRADED: Health = "degraded"

CONNECT_TIMEOUT = 0.25
COMMAND_TIMEOUT = 0.5
# Connections at once: each call holds one for a round trip (under a millisecond), so a few dozen serve
# thousands of calls a second. A call waits at most POOL_WAIT for one, then counts as a failure.
MAX_CONNECTIONS = 32
POOL_WAIT = 0.5
CHECK_SECONDS = 1.0
HIDDEN = "(hidden)"

# Joined to observe.metrics' exposition. In multi-process mode (PROMETHEUS_MULTIPROC_DIR) the values go to
# that folder whatever the registry: `livemin`, so Redis reads up only if every live worker reaches it.
REGISTRY = CollectorRegistry()


class RedisUnavailable(Exception):
    """Redis did not answer a call, or refused it: the caller falls back to its degraded behaviour."""


class _LinkMetrics:
    def __init__(self) -> None:
        self.up = Gauge(
            "gateway_redis_up",
            "1 while Redis (REDIS_URL) answers the gateway, 0 while it runs in degraded mode",
            registry=REGISTRY,
            multiprocess_mode="livemin",
        )
        self.degraded = Counter(
            "gateway_redis_degraded",
            "Times the gateway lost Redis (REDIS_URL) and went into degraded mode",
            registry=REGISTRY,
        )


_metrics: _LinkMetrics | None = None


def _link_metrics() -> _LinkMetrics:
    """The process's one set, made with its first link: two would register the same names twice."""
    global _metrics
    if _metrics is None:
        _metrics = _LinkMetrics()
    return _metrics


def shown_url(url: str) -> str:
    """`url` as logs may show it: scheme, host, port and database or socket path; no user, password or
    query (redis-py reads `?password=` too)."""
    parsed = URL(url)
    if parsed.scheme == "unix":
        return f"unix://{parsed.path}"
    port = f":{parsed.explicit_port}" if parsed.explicit_port is not None else ""
    host = f"[{parsed.raw_host}]" if ":" in (parsed.raw_host or "") else parsed.raw_host
    return f"{parsed.scheme}://{host}{port}{parsed.path.rstrip('/')}"


def _secrets_in(url: str) -> list[str]:
    """The password in `url`, as written and as decoded: what a reason must never repeat."""
    parsed = URL(url)
    found = [parsed.raw_password, parsed.password, parsed.query.get("password")]
    secrets = {secret for secret in found if secret} | {unquote(secret) for secret in found if secret}
    return sorted(secrets, key=len, reverse=True)  # the longest first: no part of one is left shown


class RedisLink:
    """One Redis client for the process (a bounded pool, short timeouts) and its health."""

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        command_timeout: float = COMMAND_TIMEOUT,
        check_seconds: float = CHECK_SECONDS,
    ) -> None:
        self.name = shown_url(url)
        self._secrets = _secrets_in(url)
        self._check_seconds = check_seconds
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=MAX_CONNECTIONS,
            timeout=POOL_WAIT,
            socket_connect_timeout=connect_timeout,
            socket_timeout=command_timeout,
            retry=Retry(NoBackoff(), retries=1),
        )
        self.client: Redis = Redis.from_pool(pool)
        # Not known until the first call: reported degraded (nothing shared is promised before Redis has
        # answered once), but that first answer, either way, is the one logged.
        self._health: Health | None = None
        self._metrics = _link_metrics()
        self._metrics.up.set(0)
        self._watcher: asyncio.Task[None] | None = None

    @property
    def health(self) -> Health:
        return self._health or DEGRADED

    @property
    def up(self) -> bool:
        return self._health == UP

    async def call(self, operation: Awaitable[T]) -> T:
        """`operation` (a call on `client`), its outcome recorded as the link's health; RedisUnavailable
        if Redis did not answer it."""
        try:
            result = await operation
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise RedisUnavailable(f"Redis at {self.name}: {self._reason(exc)}") from None
        self._answered()
        return result

    async def check(self) -> Health:
        """Ping Redis now; the link's health after it."""
        with suppress(RedisUnavailable):
            await self.call(self.client.ping())
        return self.health

    async def watch(self) -> None:
        """Check Redis every `check_seconds`, for as long as the task runs."""
        while True:
            await self.check()
            await asyncio.sleep(self._check_seconds)

    async def start(self) -> None:
        """The first check, then `watch` in the background until `aclose`."""
        await self.check()
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch_after_first(), name="redis-link-watch")

    async def _watch_after_first(self) -> None:
        await asyncio.sleep(self._check_seconds)
        await self.watch()

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self.client.aclose()

    def _answered(self) -> None:
        if self._health == UP:
            return
        if self._health == DEGRADED:
            logger.warning("Redis at %s answers again: shared state is back", self.name)
        else:
            logger.info("Redis at %s answers", self.name)
        self._health = UP
        self._metrics.up.set(1)

    def _failed(self, exc: BaseException) -> None:
        if self._health == DEGRADED:
            return
        self._health = DEGRADED
        self._metrics.up.set(0)
        self._metrics.degraded.inc()
        logger.warning("Redis at %s does not answer (%s): degraded mode", self.name, self._reason(exc))

    def _reason(self, exc: BaseException) -> str:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        for secret in self._secrets:
            reason = reason.replace(secret, HIDDEN)
        return reason
