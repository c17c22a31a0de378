"""Quotas: a limit on tokens, slot-seconds and/or requests per day or month, for a person or an API key.

What counts is what reached Ollama (`usage.store.Spent`). Each subject's use in its current period is read
from the records once (after writing those still waiting in the writer), then kept here: every request that
ends adds what it used to the kept figures of its person and its key (`count`), whether or not a quota held
it, so a quota set again, or another period's, still sees all of it.

Overshoot is bounded by holding an estimate for every request in flight: a request is refused (429) as soon
as what was used plus what is held reaches a limit. Requests already running when the quota ran out still
finish, so a quota is overrun by at most what they use beyond their estimates; a request limit, whose
estimate is exact (one), is never overrun. The token estimate is the prompt's size plus the subject's usual
answer length; the slot-seconds one is the model's usual cost (fleet.scheduler).
"""

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.exc import SQLAlchemyError

from core.storage_errors import StorageError
from db.engine import Database
from usage.periods import Period, Span, current_span
from usage.records import UsageRecord
from usage.store import Spent, UsageStore

FIRST_ANSWER_TOKENS = 256  # the answer length assumed before a subject's first one is known
SMOOTHING = 0.2


@dataclass(frozen=True)
class Quota:
    period: Period
    tokens: int | None = None
    slot_seconds: float | None = None
    requests: int | None = None

    @classmethod
    def from_stored(cls, stored: dict[str, Any] | None) -> "Quota | None":
        if not stored:
            return None
        return cls(
            Period(stored["period"]), stored.get("tokens"), stored.get("slot_seconds"), stored.get("requests")
        )


@dataclass(frozen=True)
class Subject:
    """Whose quota: a person's (`user`) or an API key's (`key`), for messages and the lookup."""

    kind: str
    id: int
    quota: Quota

    @property
    def name(self) -> str:
        return "your" if self.kind == "user" else "this API key's"


def subjects_of(
    user_id: int, user_quota: dict[str, Any] | None, key_id: int | None, key_quota: dict[str, Any] | None
) -> list[Subject]:
    """The quotas a request counts against: its person's and its API key's, those that are set."""
    subjects = []
    if (quota := Quota.from_stored(user_quota)) is not None:
        subjects.append(Subject("user", user_id, quota))
    if key_id is not None and (quota := Quota.from_stored(key_quota)) is not None:
        subjects.append(Subject("key", key_id, quota))
    return subjects


@dataclass(frozen=True)
class Estimate:
    tokens: float
    slot_seconds: float
    requests: int = 1


@dataclass
class _Ledger:
    span: Span
    used: Spent
    held_tokens: float = 0.0
    held_seconds: float = 0.0
    held_requests: int = 0


@dataclass
class Hold:
    """What the quotas hold for one request in flight, given back (and what it used counted) by `settle`."""

    ledgers: list[_Ledger]
    estimate: Estimate
    settled: bool = False


class QuotaExceeded(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


@dataclass
class QuotaBook:
    db: Database
    store: UsageStore
    zone: ZoneInfo
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    # Writes the records not yet written (usage.writer), before a subject's use is read from them.
    flush: Callable[[], Awaitable[None]] | None = None
    _ledgers: dict[tuple[str, int, Period], _Ledger] = field(default_factory=dict)
    _loading: dict[tuple[str, int, Period], asyncio.Future[_Ledger]] = field(default_factory=dict)
    _answer_tokens: dict[tuple[str, int], float] = field(default_factory=dict)

    def answer_tokens(self, subjects: list[Subject]) -> float:
        return max(
            (self._answer_tokens.get((s.kind, s.id), FIRST_ANSWER_TOKENS) for s in subjects),
            default=FIRST_ANSWER_TOKENS,
        )

    async def hold(self, subjects: list[Subject], estimate: Estimate) -> Hold:
        """Hold `estimate` against every subject's quota, or raise QuotaExceeded naming the first limit
        reached (nothing held then)."""
        now = self.clock().astimezone(UTC)  # compared with spans of another zone: by the instant
        ledgers = [await self._ledger(subject, now) for subject in subjects]
        for subject, ledger in zip(subjects, ledgers, strict=True):
            reached = _limit_reached(subject.quota, ledger)
            if reached is not None:
                period, until = subject.quota.period, ledger.span.end.isoformat()
                raise QuotaExceeded(
                    f"quota exceeded: {subject.name} limit of {reached} per {period} is used up "
                    f"(it resets at {until})",
                    ledger.span.seconds_left(now),
                )
        for ledger in ledgers:
            ledger.held_tokens += estimate.tokens
            ledger.held_seconds += estimate.slot_seconds
            ledger.held_requests += estimate.requests
        return Hold(ledgers, estimate)

    def count(self, record: UsageRecord) -> None:
        """A request ended: what it used (if it reached Ollama) counts for its person and its key, in every
        period kept for them, whether a quota held it or not."""
        if record.host is None or not self._ledgers:  # no quota read yet: nothing kept to add to
            return
        owners = [("user", record.user_id)]
        if record.key_id is not None:
            owners.append(("key", record.key_id))
        for kind, owner in owners:
            for period in Period:
                ledger = self._ledgers.get((kind, owner, period))
                if ledger is not None and ledger.span.start <= record.at < ledger.span.end:
                    used = ledger.used
                    ledger.used = Spent(
                        used.requests + 1,
                        used.tokens + record.tokens,
                        used.slot_seconds + (record.slot_seconds or 0),
                    )

    def settle(self, hold: Hold, subjects: list[Subject], record: UsageRecord) -> None:
        """The request ended: what it held goes back (what it used is `count`'s)."""
        if hold.settled:
            return
        hold.settled = True
        for ledger in hold.ledgers:
            ledger.held_tokens -= hold.estimate.tokens
            ledger.held_seconds -= hold.estimate.slot_seconds
            ledger.held_requests -= hold.estimate.requests
        if record.completion_tokens is not None and not record.estimated:
            for subject in subjects:
                key = (subject.kind, subject.id)
                before = self._answer_tokens.get(key, float(record.completion_tokens))
                self._answer_tokens[key] = before + SMOOTHING * (record.completion_tokens - before)

    async def _ledger(self, subject: Subject, now: datetime) -> _Ledger:
        key = (subject.kind, subject.id, subject.quota.period)
        ledger = self._ledgers.get(key)
        if ledger is not None and ledger.span.start <= now < ledger.span.end:
            return ledger
        loading = self._loading.get(key)
        if loading is None:
            # One read per subject and period, however many of its requests arrive at once.
            span = current_span(subject.quota.period, self.zone, now)
            loading = self._loading[key] = asyncio.ensure_future(self._load(key, subject, span))
        return await asyncio.shield(loading)

    async def _load(self, key: tuple[str, int, Period], subject: Subject, span: Span) -> _Ledger:
        """Read a subject's use, and keep it as the one ledger of its period. Kept and no longer loading in
        one step: a request that came between the two would read again and hold against a second ledger of
        its own (a second budget; seen on Postgres, whose reads take longer)."""
        try:
            ledger = await self._read(subject, span)
            self._ledgers[key] = ledger
            return ledger
        finally:
            self._loading.pop(key, None)

    async def _read(self, subject: Subject, span: Span) -> _Ledger:
        if self.flush is not None:
            # What ended just now is in the read (a quota set right after some use counts it). A request
            # that ends while the read runs is in neither (it is not kept yet): an overshoot of one at most.
            # A failed write is retried by the writer; the read then says what it can.
            with contextlib.suppress(StorageError, SQLAlchemyError):
                await self.flush()
        if subject.kind == "user":
            spent = await self.db.run(self.store.spent, span.start, user_id=subject.id)
        else:
            spent = await self.db.run(self.store.spent, span.start, key_id=subject.id)
        return _Ledger(span, spent)


def _limit_reached(quota: Quota, ledger: _Ledger) -> str | None:
    used = ledger.used
    if quota.requests is not None and used.requests + ledger.held_requests >= quota.requests:
        return f"{quota.requests} requests"
    if quota.tokens is not None and used.tokens + ledger.held_tokens >= quota.tokens:
        return f"{quota.tokens} tokens"
    if quota.slot_seconds is not None and used.slot_seconds + ledger.held_seconds >= quota.slot_seconds:
        return f"{quota.slot_seconds:g} slot-seconds"
    return None
