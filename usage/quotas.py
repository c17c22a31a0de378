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

With REDIS_URL, the ledgers of subjects with a quota live in Redis instead (`usage.shared_quotas`), one per
subject and period for every replica: the replicas together hold one quota, with the same bound. Without
REDIS_URL, or for people and keys with no quota, nothing here touches Redis. When Redis does not answer,
QUOTAS_WITHOUT_REDIS says what happens to the calls of people and keys with a quota: `closed` refuses them
(503, Retry-After), `open` holds them against this replica's own ledgers, read from the records as above
(each replica then lets through up to the whole quota). Either way it is said once in the log, and each
such call is counted (`gateway_quota_checks_without_redis_total`); when Redis answers again, the shared
ledgers are used again and this replica's are dropped (read afresh at the next spell).
"""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

from prometheus_client import Counter
from sqlalchemy.exc import SQLAlchemyError

from cluster.redis_link import REGISTRY, RedisUnavailable
from core.storage_errors import StorageError
from db.engine import Database
from usage.periods import Period, Span, current_span
from usage.records import UsageRecord
from usage.shared_quotas import SEED_ATTEMPTS, Ledger, Refused, SharedLedgers
from usage.store import Spent, UsageStore

logger = logging.getLogger("gateway.usage")

FIRST_ANSWER_TOKENS = 256  # the answer length assumed before a subject's first one is known
SMOOTHING = 0.2
# QUOTAS_WITHOUT_REDIS
CLOSED = "closed"
OPEN = "open"
# Retry-After of a call refused because Redis does not answer: the link checks it every second.
UNAVAILABLE_RETRY_AFTER = 5
UNAVAILABLE = (
    "quotas can't be checked right now (the gateway's shared store does not answer), so requests counted "
    "against a quota are refused for the moment; try again in a few seconds"
)


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
    """What the quotas hold for one request in flight, given back (and what it used counted) by `settle`:
    in this process's `ledgers`, or in Redis (`holder`, in the ledgers `keys`)."""

    ledgers: list[_Ledger]
    estimate: Estimate
    settled: bool = False
    holder: str | None = None
    keys: list[str] = field(default_factory=list)


class QuotaExceeded(Exception):
    status = 429

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class QuotaUnavailable(QuotaExceeded):
    """Redis does not answer and QUOTAS_WITHOUT_REDIS is `closed`: a quota can't be checked, so the call is
    refused, as unavailable for now rather than as over its quota."""

    status = 503


class _UnsharedMetrics:
    def __init__(self) -> None:
        self.checks = Counter(
            "gateway_quota_checks_without_redis",
            "Model calls of people or keys with a quota decided while Redis did not answer: refused "
            "(QUOTAS_WITHOUT_REDIS=closed) or held against this replica's own count (open)",
            ["mode"],
            registry=REGISTRY,
        )


_metrics: _UnsharedMetrics | None = None


def _unshared_metrics() -> _UnsharedMetrics:
    """Made with the first shared book: a gateway without REDIS_URL shows none."""
    global _metrics
    if _metrics is None:
        _metrics = _UnsharedMetrics()
    return _metrics


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
    # With REDIS_URL: the ledgers every replica shares, and what to do when Redis does not answer.
    shared: SharedLedgers | None = None
    without_redis: str = CLOSED
    _seeding: dict[str, asyncio.Future[None]] = field(default_factory=dict)
    _unshared: bool = False

    def __post_init__(self) -> None:
        if self.shared is not None:
            _unshared_metrics()

    def answer_tokens(self, subjects: list[Subject]) -> float:
        return max(
            (self._answer_tokens.get((s.kind, s.id), FIRST_ANSWER_TOKENS) for s in subjects),
            default=FIRST_ANSWER_TOKENS,
        )

    async def hold(self, subjects: list[Subject], estimate: Estimate) -> Hold:
        """Hold `estimate` against every subject's quota, or raise QuotaExceeded naming the first limit
        reached (nothing held then)."""
        if not subjects:
            return Hold([], estimate)
        now = self.clock().astimezone(UTC)  # compared with spans of another zone: by the instant
        if self.shared is not None:
            try:
                hold = await self._hold_shared(self.shared, subjects, estimate, now)
            except RedisUnavailable as exc:
                self._without_redis(exc)
            except QuotaExceeded:
                self._shared_again()  # a refusal from Redis is an answer too
                raise
            else:
                self._shared_again()
                return hold
        return await self._hold_here(subjects, estimate, now)

    async def _hold_here(self, subjects: list[Subject], estimate: Estimate, now: datetime) -> Hold:
        ledgers = [await self._ledger(subject, now) for subject in subjects]
        for subject, ledger in zip(subjects, ledgers, strict=True):
            reached = _limit_reached(subject.quota, ledger)
            if reached is not None:
                raise self._exceeded(subject, ledger.span, reached, now)
        for ledger in ledgers:
            ledger.held_tokens += estimate.tokens
            ledger.held_seconds += estimate.slot_seconds
            ledger.held_requests += estimate.requests
        return Hold(ledgers, estimate)

    async def _hold_shared(
        self, shared: SharedLedgers, subjects: list[Subject], estimate: Estimate, now: datetime
    ) -> Hold:
        spans = [current_span(subject.quota.period, self.zone, now) for subject in subjects]
        ledgers = [
            Ledger(
                shared.key(subject.kind, subject.id, span),
                subject.quota.requests,
                subject.quota.tokens,
                subject.quota.slot_seconds,
                span,
            )
            for subject, span in zip(subjects, spans, strict=True)
        ]
        holder = shared.new_holder()
        amounts = (estimate.tokens, estimate.slot_seconds, estimate.requests)
        for _ in range(SEED_ATTEMPTS):
            try:
                unseeded = await shared.hold(ledgers, amounts, holder)
            except Refused as refused:
                subject, span = subjects[refused.index], spans[refused.index]
                limit = _limit_name(subject.quota, refused.limit)
                raise self._exceeded(subject, span, limit, now) from None
            if not unseeded:
                return Hold([], estimate, holder=holder, keys=[ledger.key for ledger in ledgers])
            await asyncio.gather(
                *(
                    self._seed(shared, subjects[index], spans[index], ledgers[index].key, cut)
                    for index, cut in unseeded
                )
            )
        raise RedisUnavailable("the quota ledgers in Redis vanish as they are seeded")

    async def _seed(self, shared: SharedLedgers, subject: Subject, span: Span, key: str, cut: str) -> None:
        """Read the subject's use before `cut` from the records, into its ledger in Redis (one read per
        ledger in this process, however many of its requests arrive at once)."""
        seeding = self._seeding.get(key)
        if seeding is None:
            seeding = self._seeding[key] = asyncio.ensure_future(
                self._read_seed(shared, subject, span, key, cut)
            )
            seeding.add_done_callback(lambda _: self._seeding.pop(key, None))
        await asyncio.shield(seeding)

    async def _read_seed(
        self, shared: SharedLedgers, subject: Subject, span: Span, key: str, cut: str
    ) -> None:
        until = datetime.fromtimestamp(int(cut) / 1000, UTC)
        spent = (await self._read(subject, span, until)).used
        await shared.seed(key, cut, spent)

    def _without_redis(self, exc: RedisUnavailable) -> None:
        """Redis did not answer a hold: said once per spell, counted each time; refused when closed."""
        _unshared_metrics().checks.labels(self.without_redis).inc()
        if not self._unshared:
            self._unshared = True
            if self.without_redis == CLOSED:
                logger.warning(
                    "quotas: %s; calls of people and keys with a quota are refused (503) until it answers "
                    "(QUOTAS_WITHOUT_REDIS=closed)",
                    exc,
                )
            else:
                logger.warning(
                    "quotas: %s; each replica now holds quotas against its own count, so together they may "
                    "let through more than a quota until it answers (QUOTAS_WITHOUT_REDIS=open)",
                    exc,
                )
        if self.without_redis == CLOSED:
            raise QuotaUnavailable(UNAVAILABLE, UNAVAILABLE_RETRY_AFTER) from None

    def _shared_again(self) -> None:
        if self._unshared:
            self._unshared = False
            # Read afresh at the next spell: what other replicas used meanwhile is in the records by then.
            self._ledgers.clear()
            logger.warning("quotas: Redis answers again; quotas are shared by every replica again")

    def _exceeded(self, subject: Subject, span: Span, reached: str, now: datetime) -> QuotaExceeded:
        return QuotaExceeded(
            f"quota exceeded: {subject.name} limit of {reached} per {subject.quota.period} is used up "
            f"(it resets at {span.end.isoformat()})",
            span.seconds_left(now),
        )

    def ended(self, hold: Hold | None, subjects: list[Subject], record: UsageRecord) -> None:
        """A request ended: what it held goes back and what it used counts, here and, for a request
        counted against a quota, in the ledgers every replica shares."""
        if hold is not None:
            self.settle(hold, subjects, record)
        self.count(record)
        if self.shared is not None and subjects:
            self._count_shared(self.shared, hold, record)

    def _count_shared(self, shared: SharedLedgers, hold: Hold | None, record: UsageRecord) -> None:
        if record.host is None and (hold is None or hold.holder is None):
            return  # refused, or never sent and held nothing in Redis: nothing to tell it
        used = None
        if record.host is not None:
            used = Spent(1, record.tokens, record.slot_seconds or 0.0)
        owners = [("user", record.user_id)]
        if record.key_id is not None:
            owners.append(("key", record.key_id))
        counted = [
            shared.key(kind, owner, current_span(period, self.zone, record.at))
            for kind, owner in owners
            for period in Period
        ]
        holder = hold.holder if hold is not None else None
        held = hold.keys if hold is not None else []
        shared.ended(holder, held, counted, record.at, used)

    async def used(self, kind: str, subject_id: int, quota: Quota) -> Spent:
        """What a subject used of its quota in the current period: every replica's, from its ledger in
        Redis if there is one; else from the records."""
        span = current_span(quota.period, self.zone, self.clock())
        if self.shared is not None:
            with contextlib.suppress(RedisUnavailable):
                spent = await self.shared.used(self.shared.key(kind, subject_id, span))
                if spent is not None:
                    return spent
        if kind == "user":
            return await self.db.run(self.store.spent, span.start, user_id=subject_id)
        return await self.db.run(self.store.spent, span.start, key_id=subject_id)

    async def forget(self, kind: str, subject_id: int) -> None:
        """A subject's quota was cleared: its ledgers in Redis go (its use is no longer counted there, so
        a quota set later must read the records again)."""
        if self.shared is None:
            return
        now = self.clock()
        keys = [self.shared.key(kind, subject_id, current_span(period, self.zone, now)) for period in Period]
        try:
            await self.shared.forget(keys)
        except RedisUnavailable as exc:
            logger.warning("quotas: %s; the cleared quota's count stays in Redis until its period ends", exc)

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

    async def _read(self, subject: Subject, span: Span, until: datetime | None = None) -> _Ledger:
        if self.flush is not None:
            # What ended just now is in the read (a quota set right after some use counts it). A request
            # that ends while the read runs is in neither (it is not kept yet): an overshoot of one at most.
            # A failed write is retried by the writer; the read then says what it can.
            with contextlib.suppress(StorageError, SQLAlchemyError):
                await self.flush()
        whose: dict[str, Any] = {"user_id": subject.id} if subject.kind == "user" else {"key_id": subject.id}
        if until is not None:
            whose["until"] = until
        return _Ledger(span, await self.db.run(self.store.spent, span.start, **whose))


def _limit_name(quota: Quota, index: int) -> str:
    """A limit as messages name it, by its place in the order the checks (here and in Redis) take them."""
    if index == 0:
        return f"{quota.requests} requests"
    if index == 1:
        return f"{quota.tokens} tokens"
    return f"{quota.slot_seconds:g} slot-seconds"


def _limit_reached(quota: Quota, ledger: _Ledger) -> str | None:
    used = ledger.used
    if quota.requests is not None and used.requests + ledger.held_requests >= quota.requests:
        return f"{quota.requests} requests"
    if quota.tokens is not None and used.tokens + ledger.held_tokens >= quota.tokens:
        return f"{quota.tokens} tokens"
    if quota.slot_seconds is not None and used.slot_seconds + ledger.held_seconds >= quota.slot_seconds:
        return f"{quota.slot_seconds:g} slot-seconds"
    return None
