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
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import ColumnElement, delete, insert, literal, select, update
from sqlalchemy.orm import Session

from core.errors import GatewayError
from core.settings import Settings
from db.engine import Database
from db.models import KnownAddress, LoginAttempt, User

logger = logging.getLogger("gateway.auth")

KNOWN_ADDRESS_DAYS = 90
ATTEMPTS_WINDOW_SECONDS = 60.0  # LOGIN_MAX_ATTEMPTS_PER_ADDRESS is per minute
IPV6_SUBSCRIBER_PREFIX = 48  # the most one end site is usually given
# Outcomes that count as failures: a pending attempt may yet fail, and must not let others past meanwhile.
_FAILURES = LoginAttempt.outcome.in_(("pending", "failed"))
# Reservations and resolutions are one at a time, in every process (db.engine.serialize): counted, then
# recorded, or two replicas could each let the last allowed attempt through.
_ATTEMPTS = "login_attempts: count, then record"

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
            return await self._db.run(function, *args)

    def _reserve(self, email: str, address: str, counted_as: str, kind: str) -> Attempt:
        """One write transaction: count, then record a pending attempt if the limits allow (blocking)."""
        limits = self.limits
        db = self._db
        now = time.time()
        with db.transaction() as session:
            db.serialize(session, _ATTEMPTS)
            oldest = now - max(limits.window_seconds, ATTEMPTS_WINDOW_SECONDS)
            session.execute(delete(LoginAttempt).where(LoginAttempt.at <= oldest))
            forgotten = now - KNOWN_ADDRESS_DAYS * 86400
            session.execute(delete(KnownAddress).where(KnownAddress.last_success <= forgotten))
            account = session.scalar(select(User.id).where(db.same_email(User.email, email)))
            known = account is not None and self._is_known(session, account, counted_as)
            this_email = db.same_email(LoginAttempt.email, email)
            this_address = LoginAttempt.address == counted_as
            failures = _Counter(session, now, limits.window_seconds, _FAILURES)
            waits = [failures.wait(this_email & this_address, limits.max_failures)]
            if not known:
                waits.append(failures.wait(this_address, limits.max_failures_per_address))
                waits.append(failures.wait(this_email, limits.max_failures_per_email))
            attempts = _Counter(session, now, ATTEMPTS_WINDOW_SECONDS, None)
            waits.append(attempts.wait(this_address, limits.max_attempts_per_address))
            wait = max(waits)
            if wait > 0:
                raise TooManyAttempts(wait)
            attempt = LoginAttempt(email=email, address=counted_as, at=now, outcome="pending")
            session.add(attempt)
            session.flush()
        return Attempt(attempt.id, email, address, counted_as, account is not None, kind)

    @staticmethod
    def _is_known(session: Session, user_id: int, counted_as: str) -> bool:
        return session.get(KnownAddress, (user_id, counted_as)) is not None

    def _resolve(self, attempt: Attempt) -> None:
        db = self._db
        with db.transaction() as session:
            db.serialize(session, _ATTEMPTS)
            this_attempt = update(LoginAttempt).where(LoginAttempt.id == attempt.id)
            if attempt.succeeded_as is None:
                session.execute(this_attempt.values(outcome="failed"))
            else:
                session.execute(this_attempt.values(outcome="succeeded"))
                session.execute(
                    update(LoginAttempt)
                    .where(
                        db.same_email(LoginAttempt.email, attempt.email),
                        LoginAttempt.address == attempt.counted_as,
                        LoginAttempt.outcome == "failed",
                    )
                    .values(outcome="forgiven")
                )
                known = session.get(KnownAddress, (attempt.succeeded_as, attempt.counted_as))
                if known is not None:
                    known.last_success = time.time()
                else:
                    # Through `users`, so that an account removed meanwhile leaves nothing behind.
                    session.execute(
                        insert(KnownAddress).from_select(
                            ["user_id", "address", "last_success"],
                            select(User.id, literal(attempt.counted_as), literal(time.time())).where(
                                User.id == attempt.succeeded_as
                            ),
                        )
                    )
        if attempt.succeeded_as is None:
            # Any string can be typed as an email, a password too by mistake: only an account's is logged.
            who = attempt.email if attempt.account_exists else "an unknown email"
            logger.warning("failed %s for %s from %s", attempt.kind, who, attempt.address)

    def lift_limits_for(self, email: str) -> None:
        """Forgive the email's failures, at every address (blocking): `manage.py reset-password`."""
        db = self._db
        with db.transaction() as session:
            db.serialize(session, _ATTEMPTS)
            session.execute(
                update(LoginAttempt)
                .where(db.same_email(LoginAttempt.email, email), _FAILURES)
                .values(outcome="forgiven")
            )


@dataclass(frozen=True)
class _Counter:
    """Counts recent attempts matching a condition, within one transaction."""

    session: Session
    now: float
    window: float
    outcomes: ColumnElement[bool] | None  # None: every attempt, successes too

    def wait(self, condition: ColumnElement[bool], limit: int) -> float:
        """Seconds until fewer than `limit` recent attempts match, 0 if that is already so."""
        query = select(LoginAttempt.at).where(condition, LoginAttempt.at > self.now - self.window)
        if self.outcomes is not None:
            query = query.where(self.outcomes)
        recent = list(self.session.scalars(query.order_by(LoginAttempt.at)))
        if len(recent) < limit:
            return 0.0
        # Allowed again once enough of the oldest have left the window.
        return recent[len(recent) - limit] + self.window - self.now
