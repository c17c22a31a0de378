"""Quotas (issue 13): set and cleared by admins per person and per API key, shown to their owners, and, beyond
a limit, every model surface answering 429 in its own error shape with Retry-After until the period resets;
bounded overshoot under concurrent requests; refused requests recorded but never counted; the period's
arithmetic in the gateway's time zone."""

import asyncio
import concurrent.futures
import json
import math
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, cast
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlalchemy import select

from db.models import UsageRow
from tests.fake_ollama import FakeOllama
from tests.servers import RunningGateway, add_user
from tests.streams import chat_body
from tests.surfaces import error_message, model_calls
from usage.periods import Period, Span, current_span, local_day
from usage.quotas import FIRST_ANSWER_TOKENS, Estimate, QuotaBook, QuotaExceeded, Subject, subjects_of
from usage.reading import prompt_estimate
from usage.records import Outcome, UsageRecord
from usage.store import Spent

MODEL = "llama3.2:1b"
PARIS = ZoneInfo("Europe/Paris")
# Surfaces that run a model; /api/show, in the same table, names a model but runs none (never counted).
MODEL_SURFACES = [(path, body) for path, body in model_calls(MODEL) if path != "/api/show"]


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def person(gateway: RunningGateway, name: str) -> tuple[int, dict[str, str]]:
    """A new person's id and their (JWT) headers (a new email each time: the session's gateway is shared)."""
    email = f"{name}-{secrets.token_hex(4)}@example.com"
    headers = bearer(add_user(gateway, email))
    user = gateway.services.users.find_by_email(email)
    return user.id, headers


def new_key(gateway: RunningGateway, headers: dict[str, str], name: str = "script") -> tuple[int, dict]:
    response = httpx.post(f"{gateway.url}/keys", json={"name": name}, headers=headers)
    assert response.status_code == 201, response.text
    created = response.json()
    return created["id"], bearer(created["key"])


def patch_quota(gateway: RunningGateway, what: str, row_id: int, quota: Any) -> httpx.Response:
    return httpx.patch(
        f"{gateway.url}/admin/{what}/{row_id}", json={"quota": quota}, headers=gateway.admin_headers()
    )


def set_quota(gateway: RunningGateway, what: str, row_id: int, **quota: Any) -> None:
    response = patch_quota(gateway, what, row_id, {"period": "day", **quota})
    assert response.status_code == 200, response.text


def chat(gateway: RunningGateway, headers: dict[str, str], **options: Any) -> httpx.Response:
    body = {**chat_body(MODEL, "Hi", **options), "stream": False}
    return httpx.post(f"{gateway.url}/api/chat", json=body, headers=headers, timeout=30)


def chats_at_ollama(fake: FakeOllama) -> int:
    return sum(1 for request in fake.requests if request.path == "/api/chat")


def usage_rows(gateway: RunningGateway) -> list[UsageRow]:
    gateway.run(gateway.services.usage.writer.flush())
    with gateway.services.db.session() as session:
        return list(session.scalars(select(UsageRow).order_by(UsageRow.id)))


def seconds_to_midnight(zone: ZoneInfo) -> int:
    return current_span(Period.DAY, zone).seconds_left(datetime.now(UTC))


# Setting, showing and clearing


@pytest.mark.storage
def test_a_persons_quota_is_set_shown_in_me_and_cleared(gateway):
    ada, headers = person(gateway, "ada")
    quota = {"period": "month", "tokens": 100_000, "slot_seconds": 3600.5, "requests": 1000}
    response = patch_quota(gateway, "users", ada, quota)
    assert response.status_code == 200, response.text
    assert response.json()["quota"] == quota
    assert httpx.get(f"{gateway.url}/me", headers=headers).json()["quota"] == quota
    shown = httpx.get(f"{gateway.url}/me/usage", headers=headers).json()["quota"]
    assert shown["used"] == {"requests": 0, "tokens": 0, "slot_seconds": 0.0}
    assert shown["resets_at"] == current_span(Period.MONTH, ZoneInfo("UTC")).end.isoformat()

    # Another change leaves the quota alone; null clears it.
    unchanged = httpx.patch(
        f"{gateway.url}/admin/users/{ada}", json={"max_inflight": 2}, headers=gateway.admin_headers()
    )
    assert unchanged.json()["quota"] == quota
    assert patch_quota(gateway, "users", ada, None).json()["quota"] is None
    assert httpx.get(f"{gateway.url}/me", headers=headers).json()["quota"] is None
    assert httpx.get(f"{gateway.url}/me/usage", headers=headers).json()["quota"] is None


@pytest.mark.storage
def test_a_keys_quota_is_set_shown_in_the_key_listings_and_cleared(gateway):
    _, headers = person(gateway, "ada")
    key_id, _ = new_key(gateway, headers)
    quota = {"period": "day", "tokens": None, "slot_seconds": None, "requests": 50}
    response = patch_quota(gateway, "keys", key_id, {"period": "day", "requests": 50})
    assert response.status_code == 200, response.text
    assert response.json()["quota"] == quota
    assert response.json()["id"] == key_id
    mine = {key["id"]: key for key in httpx.get(f"{gateway.url}/keys", headers=headers).json()}
    everyone = {
        key["id"]: key
        for key in httpx.get(f"{gateway.url}/admin/keys", headers=gateway.admin_headers()).json()
    }
    assert mine[key_id]["quota"] == everyone[key_id]["quota"] == quota

    # A patch without `quota` changes nothing; null clears it.
    kept = httpx.patch(f"{gateway.url}/admin/keys/{key_id}", json={}, headers=gateway.admin_headers())
    assert kept.status_code == 200 and kept.json()["quota"] == quota
    assert patch_quota(gateway, "keys", key_id, None).json()["quota"] is None
    assert httpx.get(f"{gateway.url}/keys", headers=headers).json()[0]["quota"] is None


@pytest.mark.storage
def test_a_quota_for_no_such_key_is_404(gateway):
    response = patch_quota(gateway, "keys", 987_654, {"period": "day", "requests": 1})
    assert response.status_code == 404
    assert response.json() == {"error": "no such key"}


@pytest.mark.storage
def test_only_an_admin_sets_a_quota(gateway):
    ada, headers = person(gateway, "ada")
    key_id, _ = new_key(gateway, headers)
    for path in (f"/admin/users/{ada}", f"/admin/keys/{key_id}"):
        response = httpx.patch(f"{gateway.url}{path}", json={"quota": None}, headers=headers)
        assert response.status_code == 403, path


BAD_QUOTAS = [
    pytest.param({"period": "week", "requests": 1}, "period", id="unknown-period"),
    pytest.param({"period": "DAY", "requests": 1}, "period", id="period-in-capitals"),
    pytest.param({"requests": 1}, "period", id="no-period"),
    pytest.param({"period": None, "requests": 1}, "period", id="null-period"),
    pytest.param({"period": "day", "tokens": -1}, "tokens", id="negative-tokens"),
    pytest.param({"period": "day", "tokens": 0}, "tokens", id="zero-tokens"),
    pytest.param({"period": "day", "tokens": 1.5}, "tokens", id="fractional-tokens"),
    pytest.param({"period": "day", "tokens": "lots"}, "tokens", id="text-tokens"),
    pytest.param({"period": "day", "tokens": 10**16}, "tokens", id="huge-tokens"),
    pytest.param({"period": "day", "slot_seconds": -0.5}, "slot_seconds", id="negative-slot-seconds"),
    pytest.param({"period": "day", "slot_seconds": 0}, "slot_seconds", id="zero-slot-seconds"),
    pytest.param({"period": "day", "requests": -3}, "requests", id="negative-requests"),
    pytest.param({"period": "day", "requests": True}, "requests", id="boolean-requests"),
    pytest.param({"period": "day", "slot_seconds": False}, "slot_seconds", id="boolean-slot-seconds"),
    pytest.param({"period": "day", "tokens": "100"}, "tokens", id="tokens-as-text"),
    pytest.param({"period": "day", "dollars": 5}, "dollars", id="unknown-field"),
    pytest.param([], "quota", id="a-list"),
    pytest.param("day", "quota", id="a-string"),
]


@pytest.mark.storage
@pytest.mark.parametrize("what", ["users", "keys"])
@pytest.mark.parametrize(("quota", "named"), BAD_QUOTAS)
def test_a_bad_quota_is_422_naming_the_field(gateway, what, quota, named):
    ada, headers = person(gateway, "ada")
    row_id = ada if what == "users" else new_key(gateway, headers)[0]
    response = patch_quota(gateway, what, row_id, quota)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert isinstance(error, str) and named in error
    assert patch_quota(gateway, what, row_id, {"period": "day"}).status_code == 200, "nothing else broke"


@pytest.mark.storage
def test_an_unknown_field_beside_the_quota_of_a_key_is_422(gateway):
    _, headers = person(gateway, "ada")
    key_id, _ = new_key(gateway, headers)
    response = httpx.patch(
        f"{gateway.url}/admin/keys/{key_id}", json={"name": "renamed"}, headers=gateway.admin_headers()
    )
    assert response.status_code == 422
    assert "name" in response.json()["error"]


@pytest.mark.storage
def test_a_quota_without_limits_refuses_nothing(gateway, ollama):
    ada, headers = person(gateway, "ada")
    set_quota(gateway, "users", ada)
    assert [chat(gateway, headers).status_code for _ in range(3)] == [200] * 3


# Beyond a limit, on every surface

LIMITS = [
    pytest.param({"requests": 1}, "1 requests", id="requests"),
    pytest.param({"tokens": 1}, "1 tokens", id="tokens"),
    pytest.param({"slot_seconds": 1e-6}, "1e-06 slot-seconds", id="slot-seconds"),
]


@pytest.mark.storage
@pytest.mark.parametrize(("path", "body"), MODEL_SURFACES, ids=[path for path, _ in MODEL_SURFACES])
def test_beyond_each_limit_every_surface_answers_429_in_its_shape_until_the_period_resets(
    make_gateway, ollama, path, body
):
    # A zone far from UTC: Retry-After counts to its midnight, not UTC's.
    zone = "Pacific/Auckland"
    gateway = make_gateway(time_zone=zone)
    for number, limit in enumerate(LIMITS):
        quota, named = limit.values
        user_id, headers = person(gateway, f"p{number}")
        set_quota(gateway, "users", user_id, **cast(dict, quota))
        first = httpx.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=30)
        assert first.status_code == 200, f"{limit.id}: {first.text}"
        sent = len(ollama.requests)

        refused = httpx.post(f"{gateway.url}{path}", json=body, headers=headers, timeout=30)
        expected_wait = seconds_to_midnight(ZoneInfo(zone))
        assert refused.status_code == 429, f"{limit.id}: {refused.text}"
        assert abs(int(refused.headers["Retry-After"]) - expected_wait) <= 5, limit.id
        error = refused.json()["error"]
        if path.startswith("/v1/"):
            assert set(error) == {"message", "type", "param", "code"}, "OpenAI's shape"
            # As OpenAI says a used-up budget (its SDKs raise RateLimitError for any 429).
            assert error["type"] == error["code"] == "insufficient_quota"
        else:
            assert isinstance(error, str), "Ollama's shape"
        message = error_message(refused)
        assert f"your limit of {named} per day" in message, message
        assert len(ollama.requests) == sent, "Ollama never saw the refused request"


@pytest.mark.storage
def test_a_streamed_chat_beyond_its_quota_is_refused_before_any_line(gateway, ollama):
    ada, headers = person(gateway, "ada")
    set_quota(gateway, "users", ada, requests=1)
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=30) as client:
        lines = [json.loads(line) for line in _streamed(client)]
        assert lines[-1]["done"] is True
        with client.stream("POST", "/api/chat", json=chat_body(MODEL)) as response:
            assert response.status_code == 429
            assert response.headers["content-type"].startswith("application/json")
            assert "limit of 1 requests" in json.loads(response.read())["error"]


def _streamed(client: httpx.Client) -> list[str]:
    with client.stream("POST", "/api/chat", json=chat_body(MODEL)) as response:
        assert response.status_code == 200
        return list(response.iter_lines())


# Whose quota


@pytest.mark.storage
def test_a_keys_quota_holds_that_key_only(gateway, ollama):
    _, token = person(gateway, "ada")
    limited_id, limited = new_key(gateway, token, "limited")
    _, other = new_key(gateway, token, "other")
    set_quota(gateway, "keys", limited_id, requests=2)
    assert [chat(gateway, limited).status_code for _ in range(2)] == [200, 200]
    refused = chat(gateway, limited)
    assert refused.status_code == 429
    assert "this API key's limit of 2 requests per day" in refused.json()["error"]
    assert chat(gateway, other).status_code == 200
    assert chat(gateway, token).status_code == 200


@pytest.mark.storage
def test_a_persons_quota_holds_all_their_keys_and_their_token(gateway, ollama):
    ada, token = person(gateway, "ada")
    _, first_key = new_key(gateway, token, "first")
    _, second_key = new_key(gateway, token, "second")
    _, bob = person(gateway, "bob")
    set_quota(gateway, "users", ada, requests=3)
    assert [chat(gateway, headers).status_code for headers in (first_key, second_key, token)] == [200] * 3
    for headers in (first_key, second_key, token):
        refused = chat(gateway, headers)
        assert refused.status_code == 429
        assert "your limit of 3 requests per day" in refused.json()["error"]
    assert chat(gateway, bob).status_code == 200, "someone else's quota"


@pytest.mark.storage
def test_a_key_within_its_own_quota_is_still_held_to_its_owners(gateway, ollama):
    ada, token = person(gateway, "ada")
    key_id, key = new_key(gateway, token)
    set_quota(gateway, "keys", key_id, requests=10)
    set_quota(gateway, "users", ada, requests=1)
    assert chat(gateway, key).status_code == 200
    refused = chat(gateway, key)
    assert refused.status_code == 429
    assert "your limit of 1 requests" in refused.json()["error"]


# Concurrent requests


@pytest.fixture
def slow_ollama(make_fake: Callable[..., FakeOllama]) -> FakeOllama:
    """An Ollama of the test's own: every request it saw is one the test sent."""
    return make_fake()


def _burst(gateway: RunningGateway, headers: dict[str, str], body: bytes, count: int) -> list[int]:
    def one(_: int) -> int:
        response = httpx.post(
            f"{gateway.url}/api/chat",
            content=body,
            headers={**headers, "Content-Type": "application/json"},
            timeout=60,
        )
        return response.status_code

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


@pytest.mark.storage
def test_concurrent_requests_never_overrun_a_request_quota(make_gateway, slow_ollama):
    gateway = make_gateway(ollama_url=slow_ollama.url)
    ada, headers = person(gateway, "ada")
    set_quota(gateway, "users", ada, requests=5)
    body = json.dumps({**chat_body(MODEL, tokens=5, interval=0.2), "stream": False}).encode()
    statuses = _burst(gateway, headers, body, 20)
    assert sorted(statuses) == [200] * 5 + [429] * 15
    assert chats_at_ollama(slow_ollama) == 5, "a request's estimate (one) is exact: never overrun"


@pytest.mark.storage
def test_concurrent_requests_overrun_a_token_quota_by_at_most_what_was_in_flight(make_gateway, slow_ollama):
    """The bound: a request is admitted only while used + held < limit, and each holds its estimate
    (its body's size / 4, plus 256 tokens of answer before any answer is known). With nothing used and 20
    requests arriving together, exactly ceil(limit / estimate) are admitted, and none ends before the others
    are refused (each answer takes over a second). What they use beyond their estimates is the overshoot:
    here each answers 300 tokens, more than was held, so the quota ends overrun by at most those requests'
    use, and the next request is refused."""
    gateway = make_gateway(ollama_url=slow_ollama.url)
    ada, headers = person(gateway, "ada")
    limit = 1000
    set_quota(gateway, "users", ada, tokens=limit)
    body = json.dumps({**chat_body(MODEL, tokens=300, interval=0.005), "stream": False}).encode()
    estimate = prompt_estimate(len(body)) + FIRST_ANSWER_TOKENS
    in_flight = math.ceil(limit / estimate)
    assert in_flight < 20

    statuses = _burst(gateway, headers, body, 20)
    assert statuses.count(200) == chats_at_ollama(slow_ollama) == in_flight
    assert statuses.count(429) == 20 - in_flight
    completed = [row for row in usage_rows(gateway) if row.outcome == Outcome.COMPLETED]
    used = sum((row.prompt_tokens or 0) + (row.completion_tokens or 0) for row in completed)
    per_request = max((row.prompt_tokens or 0) + (row.completion_tokens or 0) for row in completed)
    assert limit <= used <= limit + in_flight * per_request
    assert chat(gateway, headers).status_code == 429, "used up"


# Refused requests


@pytest.mark.storage
def test_a_refused_request_is_recorded_as_refused_and_never_counted(gateway, ollama):
    ada, headers = person(gateway, "ada")
    set_quota(gateway, "users", ada, requests=2)
    assert [chat(gateway, headers).status_code for _ in range(4)] == [200, 200, 429, 429]

    report = httpx.get(
        f"{gateway.url}/admin/usage", params={"group_by": "user"}, headers=gateway.admin_headers()
    ).json()
    [row] = [row for row in report["rows"] if row["user"] == ada]
    assert row["requests"] == 4, "a record for each request, refused ones included"
    refused = [row for row in usage_rows(gateway) if row.user_id == ada and row.outcome == Outcome.REFUSED]
    assert [(row.status, row.host, row.prompt_tokens, row.slot_seconds) for row in refused] == [
        (429, None, 0, 0.0)
    ] * 2
    used = httpx.get(f"{gateway.url}/me/usage", headers=headers).json()["quota"]["used"]
    assert used["requests"] == 2, "only what reached Ollama counts"

    # One more allowed: the refused ones took none of it.
    set_quota(gateway, "users", ada, requests=3)
    assert chat(gateway, headers).status_code == 200
    assert chat(gateway, headers).status_code == 429


@pytest.mark.storage
def test_a_quota_raised_or_cleared_takes_effect_at_once(gateway, ollama):
    ada, headers = person(gateway, "ada")
    set_quota(gateway, "users", ada, requests=1)
    assert [chat(gateway, headers).status_code for _ in range(2)] == [200, 429]
    set_quota(gateway, "users", ada, requests=2)
    assert [chat(gateway, headers).status_code for _ in range(2)] == [200, 429]
    assert patch_quota(gateway, "users", ada, None).status_code == 200
    assert chat(gateway, headers).status_code == 200


@pytest.mark.storage
def test_a_quota_set_again_counts_what_was_used_while_there_was_none(gateway, ollama):
    ada, headers = person(gateway, "ada")
    set_quota(gateway, "users", ada, requests=3)
    assert chat(gateway, headers).status_code == 200
    assert patch_quota(gateway, "users", ada, None).status_code == 200
    assert [chat(gateway, headers).status_code for _ in range(2)] == [200, 200]
    set_quota(gateway, "users", ada, requests=3)
    assert chat(gateway, headers).status_code == 429, "three were used today"


@pytest.mark.storage
def test_a_quota_set_right_after_some_use_counts_it(gateway, ollama):
    _, token = person(gateway, "ada")
    key_id, key = new_key(gateway, token)
    assert chat(gateway, key).status_code == 200
    # At once: the record may still wait in the writer's batch.
    set_quota(gateway, "keys", key_id, requests=1)
    assert chat(gateway, key).status_code == 429


# Periods, in the gateway's time zone


def _utc(*fields: int) -> datetime:
    return _local(UTC, *fields)


def _local(
    zone: tzinfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0
) -> datetime:
    return datetime(year, month, day, hour, minute, second, tzinfo=zone)


def test_a_day_runs_from_local_midnight_to_local_midnight():
    # 23:30 UTC on 14 June is already the 15th in Paris (UTC+2).
    span = current_span(Period.DAY, PARIS, _utc(2026, 6, 14, 23, 30))
    assert span == Span(_local(PARIS, 2026, 6, 15), _local(PARIS, 2026, 6, 16))
    assert span.end - span.start == timedelta(hours=24)
    assert local_day(_utc(2026, 6, 14, 23, 30), PARIS) == "2026-06-15"


@pytest.mark.parametrize(
    ("now", "hours"),
    [
        pytest.param(_utc(2026, 3, 29, 12), 23, id="spring-forward"),
        pytest.param(_utc(2026, 10, 25, 12), 25, id="fall-back"),
        pytest.param(_utc(2026, 10, 25, 0, 30), 25, id="in-the-repeated-hour"),
        pytest.param(_utc(2026, 10, 25, 1, 30), 25, id="after-the-repeated-hour"),
    ],
)
def test_a_day_across_a_dst_change_is_its_true_length(now, hours):
    span = current_span(Period.DAY, PARIS, now)
    assert span.start <= now < span.end
    # In UTC: two datetimes of one zone subtract by their wall clocks.
    assert (span.end.astimezone(UTC) - span.start.astimezone(UTC)).total_seconds() == hours * 3600
    assert span.start.astimezone(PARIS).hour == span.end.astimezone(PARIS).hour == 0


@pytest.mark.parametrize(
    ("now", "hours"),
    [
        pytest.param((2026, 3, 29, 0, 30), 22.5, id="spring-forward"),
        pytest.param((2026, 10, 25, 0, 30), 24.5, id="fall-back"),
        pytest.param((2026, 10, 24, 22), 2, id="the-evening-before"),
    ],
)
def test_the_seconds_left_across_a_dst_change_are_real_seconds(now, hours):
    # Half past midnight in Paris on the days clocks change (02:00 → 03:00 in March, 03:00 → 02:00 in
    # October): the wall clock says 23.5 hours to midnight, but an hour less or more goes by.
    moment = _local(PARIS, *now)
    assert current_span(Period.DAY, PARIS, moment).seconds_left(moment) == hours * 3600


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        pytest.param((2026, 1, 31, 23, 59), (2026, 1, 1), (2026, 2, 1), id="january-last-minute"),
        pytest.param((2026, 2, 28, 12), (2026, 2, 1), (2026, 3, 1), id="february"),
        pytest.param((2028, 2, 29, 12), (2028, 2, 1), (2028, 3, 1), id="leap-february"),
        pytest.param((2026, 12, 31, 23), (2026, 12, 1), (2027, 1, 1), id="december"),
        pytest.param((2026, 3, 15), (2026, 3, 1), (2026, 4, 1), id="a-month-with-a-dst-change"),
        pytest.param((2026, 5, 1), (2026, 5, 1), (2026, 6, 1), id="its-first-moment"),
    ],
)
def test_a_month_runs_from_its_first_local_midnight_to_the_next_months(now, start, end):
    moment = _local(PARIS, *now)
    span = current_span(Period.MONTH, PARIS, moment)
    assert span == Span(_local(PARIS, *start), _local(PARIS, *end))
    assert span.start <= moment < span.end


def test_a_month_starts_in_the_gateways_zone_not_utcs():
    # 23:30 UTC on 30 April is 1 May in Paris, but still April in New York.
    now = _utc(2026, 4, 30, 23, 30)
    assert current_span(Period.MONTH, PARIS, now).start == _local(PARIS, 2026, 5, 1)
    new_york = ZoneInfo("America/New_York")
    assert current_span(Period.MONTH, new_york, now).start == _local(new_york, 2026, 4, 1)


@pytest.mark.parametrize(
    ("left", "retry_after"),
    [
        pytest.param(timedelta(0), 1, id="at-the-reset"),
        pytest.param(timedelta(microseconds=1), 1, id="a-microsecond-before"),
        pytest.param(timedelta(milliseconds=999), 1, id="under-a-second"),
        pytest.param(timedelta(seconds=1), 1, id="one-second"),
        pytest.param(timedelta(seconds=10, milliseconds=500), 11, id="rounded-up"),
        pytest.param(timedelta(hours=5), 5 * 3600, id="hours"),
    ],
)
def test_retry_after_is_whole_seconds_to_the_reset_and_at_least_one(left, retry_after):
    span = current_span(Period.DAY, PARIS, _utc(2026, 6, 14, 12))
    assert span.seconds_left(span.end - left) == retry_after


# The quota book on a clock of the test's own


class _Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now.astimezone(UTC)  # as the gateway's clock gives it


class _NoDatabase:
    """Runs the store's reads at once; the store finds nothing used before."""

    reads = 0

    async def run(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self.reads += 1
        return function(*args, **kwargs)


class _NothingSpent:
    def spent(self, since: datetime, *, user_id: int | None = None, key_id: int | None = None) -> Spent:
        return Spent()


def _book(clock: _Clock) -> tuple[QuotaBook, _NoDatabase]:
    db = _NoDatabase()
    return QuotaBook(cast(Any, db), cast(Any, _NothingSpent()), PARIS, clock=clock), db


def _sent(book: QuotaBook, user_id: int, tokens: int, seconds: float) -> UsageRecord:
    """A request that reached Ollama, ending now by the book's clock."""
    return UsageRecord(
        at=book.clock(),
        user_id=user_id,
        key_id=None,
        surface="/api/chat",
        model=MODEL,
        band="interactive",
        outcome=Outcome.COMPLETED,
        status=200,
        host="h1",
        prompt_tokens=tokens,
        completion_tokens=0,
        slot_seconds=seconds,
    )


async def _hold_and_settle(
    book: QuotaBook, subjects: list[Subject], tokens: int = 0, seconds: float = 0
) -> None:
    hold = await book.hold(subjects, Estimate(tokens=1, slot_seconds=0.1))
    record = _sent(book, subjects[0].id, tokens, seconds)
    book.settle(hold, subjects, record)
    book.count(record)


def test_the_quota_book_refuses_until_the_local_midnight_then_starts_afresh():
    async def scenario() -> None:
        clock = _Clock(_local(PARIS, 2026, 10, 24, 23, 59, 30))
        book, db = _book(clock)
        subjects = subjects_of(7, {"period": "day", "requests": 2}, None, None)
        await _hold_and_settle(book, subjects)
        await _hold_and_settle(book, subjects)
        with pytest.raises(QuotaExceeded) as refused:
            await book.hold(subjects, Estimate(1, 0.1))
        assert refused.value.retry_after == 30
        assert "your limit of 2 requests per day" in refused.value.message
        assert "2026-10-25T00:00:00+02:00" in refused.value.message, "when it resets, in the gateway's zone"
        assert db.reads == 1, "the period's use is read once, then kept"

        clock.now = _local(PARIS, 2026, 10, 25, 0, 0, 0)
        await _hold_and_settle(book, subjects)
        assert db.reads == 2, "a new period: read again"
        await _hold_and_settle(book, subjects)
        with pytest.raises(QuotaExceeded) as refused_again:
            await book.hold(subjects, Estimate(1, 0.1))
        # The day clocks go back has 25 hours.
        assert refused_again.value.retry_after == 25 * 3600

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("quota", "named"),
    [
        pytest.param({"tokens": 100}, "100 tokens", id="tokens"),
        pytest.param({"slot_seconds": 2.5}, "2.5 slot-seconds", id="slot-seconds"),
    ],
)
def test_the_quota_book_counts_what_requests_used(quota, named):
    async def scenario() -> None:
        book, _ = _book(_Clock(_local(PARIS, 2026, 2, 10, 12)))
        subjects = subjects_of(7, {"period": "month", **quota}, None, None)
        await _hold_and_settle(book, subjects, tokens=60, seconds=1.5)
        await _hold_and_settle(book, subjects, tokens=60, seconds=1.5)
        with pytest.raises(QuotaExceeded) as refused:
            await book.hold(subjects, Estimate(1, 0.1))
        assert f"your limit of {named} per month" in refused.value.message
        # Until 1 March, midnight in Paris: 18 days and 12 hours.
        assert refused.value.retry_after == int(timedelta(days=18, hours=12).total_seconds())

    asyncio.run(scenario())


def test_the_quota_book_holds_estimates_while_requests_run():
    async def scenario() -> None:
        book, _ = _book(_Clock(_local(PARIS, 2026, 2, 10, 12)))
        subjects = subjects_of(7, {"period": "day", "tokens": 1000}, None, None)
        holds = [await book.hold(subjects, Estimate(tokens=300, slot_seconds=1)) for _ in range(4)]
        with pytest.raises(QuotaExceeded):
            await book.hold(subjects, Estimate(tokens=300, slot_seconds=1))  # 1200 held
        ended = _sent(book, 7, 10, 0.1)  # used 10 of its 300
        book.settle(holds[0], subjects, ended)
        book.count(ended)
        await book.hold(subjects, Estimate(tokens=300, slot_seconds=1))

    asyncio.run(scenario())


def test_the_quota_book_counts_a_refused_or_unsent_request_as_nothing():
    async def scenario() -> None:
        book, _ = _book(_Clock(_local(PARIS, 2026, 2, 10, 12)))
        subjects = subjects_of(7, {"period": "day", "requests": 1}, None, None)
        hold = await book.hold(subjects, Estimate(1, 0.1))
        unsent = _sent(book, 7, 0, 0)
        unsent.host, unsent.outcome = None, Outcome.TIMEOUT
        book.settle(hold, subjects, unsent)
        book.count(unsent)
        await book.hold(subjects, Estimate(1, 0.1))

    asyncio.run(scenario())
