"""Quotas shared through Redis (usage.shared_quotas, issue 14), on a real Redis and a real database: several
quota books on one database and one Redis stand for replicas. Together they let exactly a request limit
through and overrun a token limit by at most what was in flight; a ledger is seeded once however many
replicas read at once, and a request ending while it is seeded counts once; a new period starts afresh; a
replica that dies leaves no hold behind for longer than the lease; without Redis, quotas are closed (503)
or open (this replica's own count, said once) by QUOTAS_WITHOUT_REDIS, and shared again when Redis is
back; people with no quota never reach Redis. Through gateways: `/me/usage` shows what every replica
counted, and a quota set again after a spell without one counts that spell.
"""

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from zoneinfo import ZoneInfo

import httpx
import pytest
import redis

from cluster.redis_link import REGISTRY, RedisLink
from db.engine import Database, database_url
from tests.databases import new_database_url
from tests.redis_server import KeySpace, ThrowawayRedis
from tests.servers import RunningGateway, add_user
from tests.streams import chat_body
from usage.periods import Period, current_span
from usage.quotas import (
    CLOSED,
    OPEN,
    Estimate,
    Hold,
    QuotaBook,
    QuotaExceeded,
    QuotaUnavailable,
    Subject,
    subjects_of,
)
from usage.records import Outcome, UsageRecord
from usage.shared_quotas import SharedLedgers
from usage.store import UsageStore

PARIS = ZoneInfo("Europe/Paris")
MODEL = "llama3.2:1b"
LEASE = 1.0

pytestmark = pytest.mark.storage


def run(test: Callable[[], Coroutine[Any, Any, None]], timeout: float = 30) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=timeout))


@pytest.fixture
def database(tmp_path: Path) -> Any:
    db = Database(database_url(new_database_url(), tmp_path))
    db.migrate()
    yield db
    db.close()


class Clock:
    def __init__(self, now: datetime | None = None) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return (self.now or datetime.now(UTC)).astimezone(UTC)


@asynccontextmanager
async def replicas(
    db: Database,
    url: str,
    prefix: str,
    count: int,
    *,
    clock: Clock | None = None,
    without_redis: str = CLOSED,
) -> AsyncIterator[list[QuotaBook]]:
    """`count` quota books on one database and one Redis, each with a link of its own: replicas."""
    links = [RedisLink(url, check_seconds=0.2) for _ in range(count)]
    books = [
        QuotaBook(
            db,
            UsageStore(db, PARIS),
            PARIS,
            clock=clock or Clock(),
            shared=SharedLedgers(link, prefix, LEASE),
            without_redis=without_redis,
        )
        for link in links
    ]
    for link in links:
        await link.start()
    try:
        yield books
    finally:
        for book in books:
            assert book.shared is not None
            await book.shared.aclose()
        for link in links:
            await link.aclose()


def record(
    book: QuotaBook, user_id: int, tokens: int = 0, seconds: float = 0.0, sent: bool = True
) -> UsageRecord:
    """A request ending now by the book's clock: sent to Ollama (and using `tokens`), or not."""
    return UsageRecord(
        at=book.clock(),
        user_id=user_id,
        key_id=None,
        surface="/api/chat",
        model=MODEL,
        band="interactive",
        outcome=Outcome.COMPLETED if sent else Outcome.TIMEOUT,
        status=200,
        host="h1" if sent else None,
        prompt_tokens=tokens,
        completion_tokens=0,
        slot_seconds=seconds,
    )


async def settled(*books: QuotaBook) -> None:
    for book in books:
        assert book.shared is not None
        await book.shared.settled()


async def ledger_use(book: QuotaBook, subject: Subject) -> tuple[int, int]:
    """(requests, tokens) the subject's ledger in Redis counts now."""
    assert book.shared is not None
    key = book.shared.key(subject.kind, subject.id, current_span(subject.quota.period, PARIS, book.clock()))
    spent = await book.shared.used(key)
    assert spent is not None, "the ledger is there and seeded"
    return spent.requests, spent.tokens


async def try_hold(book: QuotaBook, subjects: list[Subject], estimate: Estimate) -> Hold | None:
    try:
        return await book.hold(subjects, estimate)
    except QuotaExceeded:
        return None


# Limits across replicas


def test_shared_a_request_limit_lets_exactly_its_requests_through_across_replicas(database, redis_keys):
    async def test() -> None:
        async with replicas(database, redis_keys.url, redis_keys.prefix, 3) as books:
            subjects = subjects_of(1, {"period": "day", "requests": 5}, None, None)
            # Thirty at once, ten on each replica, none ended yet.
            holds = await asyncio.gather(
                *(try_hold(books[n % 3], subjects, Estimate(10, 0.1)) for n in range(30))
            )
            admitted = [(n % 3, hold) for n, hold in enumerate(holds) if hold is not None]
            assert len(admitted) == 5
            for replica, hold in admitted:
                books[replica].ended(hold, subjects, record(books[replica], 1, tokens=10))
            await settled(*books)
            for book in books:
                with pytest.raises(QuotaExceeded, match="your limit of 5 requests per day"):
                    await book.hold(subjects, Estimate(10, 0.1))
            assert await ledger_use(books[0], subjects[0]) == (5, 50)

    run(test)


def test_shared_a_token_limit_is_overrun_by_at_most_what_was_in_flight_across_replicas(database, redis_keys):
    """Each request holds 300 tokens and uses 350; sixty of them over three replicas, each ending after a
    moment. A request is admitted only while used + held < 1000 on every replica together, so at most
    ceil(1000 / 300) = 4 are in flight at the last admission: the quota ends overrun by at most 4 x 350.
    Three replicas counting on their own would each let about that many through."""

    async def test() -> None:
        limit, estimate, use = 1000, 300, 350
        async with replicas(database, redis_keys.url, redis_keys.prefix, 3) as books:
            subjects = subjects_of(2, {"period": "day", "tokens": limit}, None, None)

            async def one(number: int) -> bool:
                book = books[number % 3]
                await asyncio.sleep(number * 0.005)
                hold = await try_hold(book, subjects, Estimate(estimate, 0.1))
                if hold is None:
                    return False
                await asyncio.sleep(0.05)
                book.ended(hold, subjects, record(book, 2, tokens=use))
                return True

            admitted = sum(await asyncio.gather(*(one(n) for n in range(60))))
            await settled(*books)
            used = (await ledger_use(books[0], subjects[0]))[1]
            assert used == admitted * use
            assert limit <= used <= limit + math.ceil(limit / estimate) * use
            with pytest.raises(QuotaExceeded, match="1000 tokens"):
                await books[2].hold(subjects, Estimate(1, 0.1))

    run(test)


# Seeding from the records


def _write(db: Database, book: QuotaBook, user_id: int, count: int, tokens: int) -> None:
    book.store.add_all([record(book, user_id, tokens=tokens) for _ in range(count)])


def test_shared_a_ledger_is_seeded_once_when_replicas_read_at_once(database, redis_keys):
    async def test() -> None:
        async with replicas(database, redis_keys.url, redis_keys.prefix, 3) as books:
            _write(database, books[0], 3, count=3, tokens=10)
            subjects = subjects_of(3, {"period": "month", "requests": 100}, None, None)
            holds = await asyncio.gather(*(book.hold(subjects, Estimate(1, 0.1)) for book in books))
            assert await ledger_use(books[0], subjects[0]) == (3, 30), "the records, once"
            for book, hold in zip(books, holds, strict=True):
                book.ended(hold, subjects, record(book, 3, tokens=5))
            await settled(*books)
            assert await ledger_use(books[1], subjects[0]) == (6, 45)

    run(test)


class GatedDatabase:
    """A database whose reads wait for `gate`: a seed caught between Redis's cut and its read."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.waiting.set()
        await self.gate.wait()
        return await self.db.run(function, *args, **kwargs)


def test_shared_a_request_ending_while_its_ledger_is_seeded_counts_once(database, redis_keys):
    async def test() -> None:
        async with replicas(database, redis_keys.url, redis_keys.prefix, 2) as (seeder, other):
            _write(database, seeder, 4, count=2, tokens=10)
            gated = GatedDatabase(database)
            seeder.db = cast(Database, gated)
            subjects = subjects_of(4, {"period": "day", "requests": 100}, None, None)
            holding = asyncio.create_task(seeder.hold(subjects, Estimate(1, 0.1)))
            await gated.waiting.wait()  # the ledger is in Redis, its cut taken, the read not done
            # Another replica's request (no hold of its own) ends now: in Redis and in the records.
            ended = record(other, 4, tokens=7)
            other.ended(None, subjects, ended)
            await settled(other)
            other.store.add_all([ended])
            gated.gate.set()
            await holding
            assert await ledger_use(seeder, subjects[0]) == (3, 27), "the two before, and the one since"

    run(test)


def test_shared_a_new_period_starts_a_new_ledger(database, redis_keys):
    async def test() -> None:
        clock = Clock()
        async with replicas(database, redis_keys.url, redis_keys.prefix, 2, clock=clock) as books:
            subjects = subjects_of(5, {"period": "day", "requests": 2}, None, None)
            for book in books:
                book.ended(await book.hold(subjects, Estimate(1, 0.1)), subjects, record(book, 5))
            await settled(*books)
            with pytest.raises(QuotaExceeded) as refused:
                await books[0].hold(subjects, Estimate(1, 0.1))
            today = current_span(Period.DAY, PARIS, clock())
            assert abs(refused.value.retry_after - today.seconds_left(clock())) <= 1

            assert books[0].shared is not None
            key = books[0].shared.key("user", 5, today)
            client = redis.Redis.from_url(redis_keys.url)
            kept = client.pexpiretime(key) / 1000 - today.end.timestamp()
            client.close()
            assert 3000 < kept <= 3600, "kept an hour after its day"

            clock.now = today.end + timedelta(seconds=1)
            for book in books:
                book.ended(await book.hold(subjects, Estimate(1, 0.1)), subjects, record(book, 5))
            await settled(*books)
            with pytest.raises(QuotaExceeded):
                await books[1].hold(subjects, Estimate(1, 0.1))
            assert await ledger_use(books[0], subjects[0]) == (2, 0)

    run(test)


# Holds in flight


def test_shared_a_hold_is_kept_while_its_replica_lives_and_expires_when_it_dies(database, redis_keys):
    async def test() -> None:
        async with replicas(database, redis_keys.url, redis_keys.prefix, 2) as (dying, other):
            subjects = subjects_of(6, {"period": "day", "requests": 1}, None, None)
            await dying.hold(subjects, Estimate(1, 0.1))
            await asyncio.sleep(LEASE * 2.5)  # renewed meanwhile
            with pytest.raises(QuotaExceeded):
                await other.hold(subjects, Estimate(1, 0.1))
            assert dying.shared is not None
            await dying.shared.aclose()  # no more renewals, and the hold never given back
            await asyncio.sleep(LEASE + 0.3)
            await other.hold(subjects, Estimate(1, 0.1))

    run(test)


def test_shared_people_with_no_quota_never_reach_redis(database):
    async def test() -> None:
        server = ThrowawayRedis()
        try:
            async with replicas(database, server.url, "q:", 1) as (book,):
                hold = await book.hold([], Estimate(1, 0.1))
                book.ended(hold, [], record(book, 7, tokens=3))
                await settled(book)
                client = redis.Redis.from_url(server.url)
                commands = {name.removeprefix("cmdstat_") for name in client.info("commandstats")}
                client.close()
                # The link's own health checks, and this INFO: no script, no read, no write.
                assert commands <= {"ping", "info", "hello", "client|setinfo", "select"}, commands
        finally:
            server.stop()

    run(test)


# Without Redis


def _checks_without_redis(mode: str) -> float:
    return REGISTRY.get_sample_value("gateway_quota_checks_without_redis_total", {"mode": mode}) or 0.0


def test_shared_quotas_closed_without_redis_refuse_with_503_then_recover(database, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.usage")

    async def test() -> None:
        server = ThrowawayRedis()
        port = server.port
        try:
            async with replicas(database, server.url, "q:", 1) as (book,):
                subjects = subjects_of(8, {"period": "day", "requests": 10}, None, None)
                await book.hold(subjects, Estimate(1, 0.1))
                server.stop()
                counted = _checks_without_redis(CLOSED)
                for _ in range(3):
                    with pytest.raises(QuotaUnavailable) as refused:
                        await book.hold(subjects, Estimate(1, 0.1))
                    assert refused.value.status == 503
                    assert refused.value.retry_after == 5
                    assert "quotas can't be checked right now" in refused.value.message
                assert _checks_without_redis(CLOSED) == counted + 3
                said = [r for r in caplog.records if "QUOTAS_WITHOUT_REDIS=closed" in r.getMessage()]
                assert len(said) == 1, "said once"
                await book.hold([], Estimate(1, 0.1))  # no quota: nothing to check

                server = ThrowawayRedis(port)  # empty: the ledger is seeded again
                await _until(lambda: book.shared is not None and book.shared.link.up)
                await book.hold(subjects, Estimate(1, 0.1))
                assert any("shared by every replica again" in r.getMessage() for r in caplog.records)
        finally:
            server.stop()

    run(test)


class CuttableLine:
    """A TCP relay to Redis that the test can cut (every connection closed, new ones refused) and mend:
    Redis out of reach with its data kept, and nothing sent while cut run later."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cut_off = False
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers |= {writer, upstream_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    def cut(self) -> None:
        self.cut_off = True
        for writer in self._writers:
            writer.close()
        self._writers.clear()

    def mend(self) -> None:
        self.cut_off = False

    async def aclose(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


def test_shared_quotas_open_without_redis_count_here_say_so_once_and_send_the_count_later(database, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.usage")

    async def test() -> None:
        server = ThrowawayRedis()
        line = CuttableLine(server.port)
        try:
            url = await line.start()
            async with replicas(database, url, "q:", 2, without_redis=OPEN) as (book, other):
                subjects = subjects_of(9, {"period": "day", "requests": 4}, None, None)
                hold = await book.hold(subjects, Estimate(1, 0.1))
                first = record(book, 9)
                book.ended(hold, subjects, first)
                await settled(book)
                book.store.add_all([first])  # as the writer would
                # Redis out of reach, its data kept: each replica counts on its own meanwhile.
                line.cut()
                counted = _checks_without_redis(OPEN)
                for _ in range(3):
                    book.ended(await book.hold(subjects, Estimate(1, 0.1)), subjects, record(book, 9))
                with pytest.raises(QuotaExceeded, match="4 requests"):
                    await book.hold(subjects, Estimate(1, 0.1))
                assert _checks_without_redis(OPEN) == counted + 4
                said = [r for r in caplog.records if "QUOTAS_WITHOUT_REDIS=open" in r.getMessage()]
                assert len(said) == 1, "said once"
                await settled(book)
                assert book.shared is not None
                assert len(book.shared._unsent) == 3, "kept to send later"

                line.mend()
                await _until(lambda: book.shared is not None and not book.shared._unsent)
                # What ended meanwhile reached the shared ledger (the records hold only the first).
                with pytest.raises(QuotaExceeded, match="4 requests"):
                    await other.hold(subjects, Estimate(1, 0.1))
                assert any("shared by every replica again" in r.getMessage() for r in caplog.records) is False
                await book.hold([], Estimate(1, 0.1))
                with pytest.raises(QuotaExceeded):
                    await book.hold(subjects, Estimate(1, 0.1))
                assert any("shared by every replica again" in r.getMessage() for r in caplog.records)
        finally:
            await line.aclose()
            server.stop()

    run(test, timeout=60)


async def _until(condition: Callable[[], bool], seconds: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "never came true"
        await asyncio.sleep(0.05)


# Through gateways


def _person(gateway: RunningGateway) -> tuple[int, dict[str, str]]:
    email = f"ada-{secrets.token_hex(4)}@example.com"
    headers = {"Authorization": f"Bearer {add_user(gateway, email)}"}
    return gateway.services.users.find_by_email(email).id, headers


def _set_quota(gateway: RunningGateway, user_id: int, quota: dict[str, Any] | None) -> None:
    response = httpx.patch(
        f"{gateway.url}/admin/users/{user_id}", json={"quota": quota}, headers=gateway.admin_headers()
    )
    assert response.status_code == 200, response.text


def _chat(gateway: RunningGateway, headers: dict[str, str]) -> httpx.Response:
    body = {**chat_body(MODEL, "Hi"), "stream": False}
    return httpx.post(f"{gateway.url}/api/chat", json=body, headers=headers, timeout=30)


def _two_gateways(make_gateway: Callable[..., RunningGateway], keys: KeySpace) -> list[RunningGateway]:
    shared = {"redis_url": keys.url, "redis_prefix": keys.prefix, "lease_seconds": LEASE}
    first = make_gateway(**shared)
    same = {"data_dir": first.settings.data_dir, "database_url": first.settings.database_url}
    second = make_gateway(**same, admin_password=first.admin_password, **shared)
    return [first, second]


def test_shared_me_usage_shows_what_every_replica_counted(make_gateway, ollama, redis_keys):
    first, second = _two_gateways(make_gateway, redis_keys)
    ada, headers = _person(first)
    _set_quota(first, ada, {"period": "day", "requests": 3})
    assert [_chat(first, headers).status_code for _ in range(2)] == [200, 200]
    first.run(cast(Any, first.services.usage.quotas.shared).settled())
    # At once: the first replica's records may still wait in its writer.
    used = httpx.get(f"{second.url}/me/usage", headers=headers).json()["quota"]["used"]
    assert used["requests"] == 2
    assert _chat(second, headers).status_code == 200
    refused = _chat(first, headers)
    assert refused.status_code == 429
    assert "your limit of 3 requests per day" in refused.json()["error"]


def test_shared_a_quota_set_again_counts_the_use_while_there_was_none(make_gateway, ollama, redis_keys):
    first, second = _two_gateways(make_gateway, redis_keys)
    ada, headers = _person(first)
    _set_quota(first, ada, {"period": "day", "requests": 3})
    assert _chat(first, headers).status_code == 200
    _set_quota(second, ada, None)
    assert [_chat(gateway, headers).status_code for gateway in (first, second)] == [200, 200]
    # Each replica writes its records within half a second; a seed reads what is written (see
    # usage.shared_quotas on what one taken sooner may miss).
    time.sleep(1)
    _set_quota(first, ada, {"period": "day", "requests": 3})
    assert _chat(second, headers).status_code == 429, "three were used today"


def test_shared_a_quota_closed_without_redis_answers_503_in_the_surfaces_shape(make_gateway, ollama):
    server = ThrowawayRedis()
    try:
        gateway = make_gateway(redis_url=server.url, lease_seconds=LEASE)
        ada, headers = _person(gateway)
        _, bob = _person(gateway)
        _set_quota(gateway, ada, {"period": "day", "requests": 10})
        assert _chat(gateway, headers).status_code == 200
        server.stop()
        refused = _chat(gateway, headers)
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "5"
        assert "quotas can't be checked right now" in refused.json()["error"]
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}
        openai = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert openai.status_code == 503
        assert "quotas can't be checked" in openai.json()["error"]["message"]
        assert _chat(gateway, bob).status_code == 200, "no quota: nothing to check"
    finally:
        server.stop()
