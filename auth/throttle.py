"""Sign-in limits: how many password checks an address, an email, or the pair of both may cost (issue 9,
item 4).

A stranger must not be able to stop a person from signing in, and nobody may monopolise password hashing:

- Each attempt (a login, or the current-password check of `/me/password`, which a leaked API key could
  otherwise use to guess the owner's password) is *reserved* before its password is checked: one write
  transaction counts the recent failures and, if the limits allow, records a pending attempt, which counts as
  a failure until it is resolved as failed or succeeded. So a hundred simultaneous guesses get no more
  checks than the limits allow (checking first and counting after let 49 of 100 through a limit of 10).
- Failures within LOGIN_WINDOW_MINUTES are limited per (email, address) pair, tightly (LOGIN_MAX_FAILURES);
  per address, more loosely (LOGIN_MAX_FAILURES_PER_ADDRESS: one address trying many emails); and per
  email across all addresses, more loosely still (LOGIN_MAX_FAILURES_PER_EMAIL: many addresses trying one
  email). One address adds at most its pair limit to an email's count, and the email's limit is larger
  (`auth.bootstrap` refuses anything else), so a stranger at one address can't lock a person out alone.
- A pair whose email has signed in from that address before (a *known address*, remembered for
  KNOWN_ADDRESS_DAYS) is exempt from the address's and the email's limits: only its own pair limit applies.
  Neither a botnet guessing a person's password nor someone spraying guesses from a shared NAT can stop
  that person from signing in where they usually do. A success forgives its pair's failures only.
- Every attempt, successes too, counts against LOGIN_MAX_ATTEMPTS_PER_ADDRESS per minute, and at most
  LOGIN_MAX_CONCURRENT_PER_ADDRESS checks per address run at once in this process (the excess is answered
  429 at once): one address can't fill the hashing queue, even with a correct password.
- Refused attempts are not recorded: they cost no hashing, and counting them would let a stranger keep a
  limit closed for ever by retrying.

IPv6 addresses count by their /48: ISPs give one subscriber a /64, a /56 (256 /64s) or a /48 (RFC 6177),
and counted by anything smaller, one stranger would be many addresses, enough to reach an email's limit alone
and lock its person out of every new address. Attempts
are kept in the database, so a restart or `manage.py` sees the same counts; the concurrency count is this
process's own.
"""

import asyncio
import ipaddress
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from anyio import to_thread

from core.database import Database
from core.errors import GatewayError
from core.settings import Settings

logger = logging.getLogger("gateway.auth")

KNOWN_ADDRESS_DAYS = 90
ATTEMPTS_WINDOW_SECONDS = 60.0  # LOGIN_MAX_ATTEMPTS_PER_ADDRESS is per minute
IPV6_SUBSCRIBER_PREFIX = 48  # the most one end site is usually given
# Outcomes that count as failures: a pending attempt may yet fail, and must not let others past meanwhile.
_FAILURES = "outcome IN ('pending', 'failed')"

T = TypeVar("T")


@dataclass(frozen=True)
class SignInLimits:
    window_seconds: float
    max_failures: int  # per (email, address) pair
    max_failures_per_address: int
    max_failures_per_email: int
    max_attempts_per_address: int  # per minute, successes included
    max_concurrent_per_address: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "SignInLimits":
        return cls(
            window_seconds=settings.login_window_minutes * 60,
            max_failures=settings.login_max_failures,
            max_failures_per_address=settings.login_max_failures_per_address,
            max_failures_per_email=settings.login_max_failures_per_email,
            max_attempts_per_address=settings.login_max_attempts_per_address,
            max_concurrent_per_address=settings.login_max_concurrent_per_address,
        )


TOO_MANY = "too many sign-in attempts: try again later"


class TooManyAttempts(GatewayError):
    def __init__(self, retry_after: float, message: str = TOO_MANY) -> None:
        super().__init__(429, message, {"Retry-After": str(max(1, math.ceil(retry_after)))})


def counting_address(address: str) -> str:
    """What limits count by: an IPv4 address itself, an IPv6 address's /48 (one subscriber may hold it all),
    anything else (a Unix socket, "unknown") as it is."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{parsed}/{IPV6_SUBSCRIBER_PREFIX}", strict=False))
    return str(parsed)


@dataclass
class Attempt:
    id: int
    email: str
    address: str  # as the client's address was seen, for the log
    counted_as: str  # as limits count it
    account_exists: bool
    kind: str
    succeeded_as: int | None = None  # the user's id, once their password was right

    def succeeded(self, user_id: int) -> None:
        """The password was right. Anything else, an exception included, resolves the attempt as failed."""
        self.succeeded_as = user_id


class SignInThrottle:
    def __init__(self, db: Database, limits: SignInLimits) -> None:
        self._db = db
        self.limits = limits
        self._checking: dict[str, int] = {}  # attempts under way per counted address (event loop only)
        # Bookkeeping writes queue here, on the event loop, rather than each in a worker thread waiting for
        # the database's write lock: a crowd of sign-ins then holds one worker thread, not the whole pool.
        self._bookkeeping = asyncio.Lock()

    @asynccontextmanager
    async def attempt(self, email: str, address: str, kind: str = "sign-in") -> AsyncIterator[Attempt]:
        """Reserve an attempt for this email from this address, or raise 429 with Retry-After. Check the
        password inside the block and call `attempt.succeeded(user_id)` if it was right."""
        counted_as = counting_address(address)
        if self._checking.get(counted_as, 0) >= self.limits.max_concurrent_per_address:
            raise TooManyAttempts(1, "too many sign-ins at once from your address: try again in a moment")
        self._checking[counted_as] = self._checking.get(counted_as, 0) + 1
        try:
            attempt = await self._write(self._reserve, email, address, counted_as, kind)
            try:
                yield attempt
            finally:
                # Should this never run (the process ends), the attempt stays pending: a failure until it
                # leaves the window, which errs on the safe side.
                await self._write(self._resolve, attempt)
        finally:
            self._checking[counted_as] -= 1
            if not self._checking[counted_as]:
                del self._checking[counted_as]

    async def _write(self, function: Callable[..., T], *args: object) -> T:
        async with self._bookkeeping:
            return await to_thread.run_sync(function, *args)

    def _reserve(self, email: str, address: str, counted_as: str, kind: str) -> Attempt:
        """One write transaction: count, then record a pending attempt if the limits allow (blocking)."""
        limits = self.limits
        now = time.time()
        with self._db.transaction() as conn:
            conn.execute(
                "DELETE FROM login_attempts WHERE at <= ?",
                (now - max(limits.window_seconds, ATTEMPTS_WINDOW_SECONDS),),
            )
            conn.execute(
                "DELETE FROM known_addresses WHERE last_success <= ?", (now - KNOWN_ADDRESS_DAYS * 86400,)
            )
            account = conn.execute("SELECT id FROM users WHERE email = ?", (email,)).fetchone()
            known = account is not None and self._is_known(conn, account["id"], counted_as)
            failures = _Counter(conn, now, limits.window_seconds, _FAILURES)
            waits = [failures.wait("email = ? AND address = ?", (email, counted_as), limits.max_failures)]
            if not known:
                waits.append(failures.wait("address = ?", (counted_as,), limits.max_failures_per_address))
                waits.append(failures.wait("email = ?", (email,), limits.max_failures_per_email))
            attempts = _Counter(conn, now, ATTEMPTS_WINDOW_SECONDS, "1")
            waits.append(attempts.wait("address = ?", (counted_as,), limits.max_attempts_per_address))
            wait = max(waits)
            if wait > 0:
                raise TooManyAttempts(wait)
            cursor = conn.execute(
                "INSERT INTO login_attempts (email, address, at, outcome) VALUES (?, ?, ?, 'pending')",
                (email, counted_as, now),
            )
        assert cursor.lastrowid is not None
        return Attempt(cursor.lastrowid, email, address, counted_as, account is not None, kind)

    @staticmethod
    def _is_known(conn: sqlite3.Connection, user_id: int, counted_as: str) -> bool:
        row = conn.execute(
            "SELECT 1 FROM known_addresses WHERE user_id = ? AND address = ?", (user_id, counted_as)
        ).fetchone()
        return row is not None

    def _resolve(self, attempt: Attempt) -> None:
        with self._db.transaction() as conn:
            if attempt.succeeded_as is None:
                conn.execute("UPDATE login_attempts SET outcome = 'failed' WHERE id = ?", (attempt.id,))
            else:
                conn.execute("UPDATE login_attempts SET outcome = 'succeeded' WHERE id = ?", (attempt.id,))
                conn.execute(
                    "UPDATE login_attempts SET outcome = 'forgiven'"
                    " WHERE email = ? AND address = ? AND outcome = 'failed'",
                    (attempt.email, attempt.counted_as),
                )
                # Through `users`, so that an account removed meanwhile leaves nothing behind.
                conn.execute(
                    "INSERT INTO known_addresses (user_id, address, last_success)"
                    " SELECT id, ?, ? FROM users WHERE id = ?"
                    " ON CONFLICT (user_id, address) DO UPDATE SET last_success = excluded.last_success",
                    (attempt.counted_as, time.time(), attempt.succeeded_as),
                )
        if attempt.succeeded_as is None:
            # Any string can be typed as an email, a password too by mistake: only an account's is logged.
            who = attempt.email if attempt.account_exists else "an unknown email"
            logger.warning("failed %s for %s from %s", attempt.kind, who, attempt.address)

    def lift_limits_for(self, email: str) -> None:
        """Forgive the email's failures, at every address (blocking): `manage.py reset-password`."""
        with self._db.transaction() as conn:
            conn.execute(
                f"UPDATE login_attempts SET outcome = 'forgiven' WHERE email = ? AND {_FAILURES}",  # noqa: S608
                (email,),
            )


@dataclass(frozen=True)
class _Counter:
    """Counts recent attempts matching a condition, within one transaction."""

    conn: sqlite3.Connection
    now: float
    window: float
    outcomes: str

    def wait(self, condition: str, params: tuple, limit: int) -> float:
        """Seconds until fewer than `limit` recent attempts match, 0 if that is already so."""
        recent = self.conn.execute(
            f"SELECT at FROM login_attempts WHERE {condition} AND {self.outcomes} AND at > ? ORDER BY at",  # noqa: S608
            (*params, self.now - self.window),
        ).fetchall()
        if len(recent) < limit:
            return 0.0
        # Allowed again once enough of the oldest have left the window.
        return recent[len(recent) - limit]["at"] + self.window - self.now
