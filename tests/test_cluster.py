"""Three gateway replicas behind nginx on one Postgres database (tests/cluster.py), without Redis: what holds
across them today because credentials, sign-in attempts and usage records live in the database, and what
losing or restarting a replica costs the other replicas' clients (nothing).

Real processes on loopback: `python main.py` three times, nginx with deploy/nginx-replicas.conf, two test
Ollama hosts. Postgres is needed, so these run in `make test`'s Postgres pass only.
"""

import concurrent.futures
import json
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.cluster import Cluster, Load, Person, Replica, running_cluster
from tests.streams import chat_body

pytestmark = [pytest.mark.storage, pytest.mark.postgres_only]

MODEL = "llama3.2:1b"
# Failed sign-ins allowed per (email, address): fewer than the replicas times two, so that spreading them
# over the replicas can only reach the limit if the replicas count them together.
MAX_FAILURES = 4
SETTINGS = {
    "LOGIN_MAX_FAILURES": str(MAX_FAILURES),
    # The tests sign people in, from 127.0.0.1, many times a minute.
    "LOGIN_MAX_ATTEMPTS_PER_ADDRESS": "1000",
}
# How soon every replica must refuse a credential ended through another (issue 14).
INVALIDATION_SECONDS = 1.0
# How soon after a replica's death nginx sends it nothing more: it takes far less, this is a loaded machine.
NOTICED_SECONDS = 0.5


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("cluster")
    with running_cluster(folder, replicas=3, hosts=2, slots=4, settings=SETTINGS) as cluster:
        yield cluster


@pytest.fixture
def cluster(started: Cluster) -> Cluster:
    """The cluster with all three replicas serving (a test before may have killed or stopped one)."""
    started.start_stopped()
    return started


def _bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


def _accepted(replica: Replica, credential: str) -> bool:
    answer = httpx.get(f"{replica.url}/me", headers=_bearer(credential))
    assert answer.status_code in (200, 401), answer.text
    return answer.status_code == 200


def _seconds_until_refused(replicas: list[Replica], credential: str, since: float) -> dict[str, float]:
    """Ask each replica in turn until every one refuses `credential`; how long each took after `since`."""
    refused: dict[str, float] = {}
    deadline = since + 10 * INVALIDATION_SECONDS
    while len(refused) < len(replicas) and time.monotonic() < deadline:
        for replica in replicas:
            if replica.name not in refused and not _accepted(replica, credential):
                refused[replica.name] = time.monotonic() - since
        time.sleep(0.01)
    return refused


def _revoke_key(cluster: Cluster, person: Person, via: Replica) -> str:
    made = httpx.post(f"{via.url}/keys", json={"name": "script"}, headers=_bearer(person.token))
    assert made.status_code == 201, made.text
    key, key_id = made.json()["key"], made.json()["id"]

    def end() -> None:
        revoked = httpx.delete(f"{via.url}/keys/{key_id}", headers=_bearer(person.token))
        assert revoked.status_code == 204, revoked.text

    return _ended(cluster, via, key, end)


def _disable(cluster: Cluster, person: Person, via: Replica) -> str:
    def end() -> None:
        changed = httpx.patch(
            f"{via.url}/admin/users/{person.id}", json={"disabled": True}, headers=cluster.admin_headers()
        )
        assert changed.status_code == 200, changed.text

    return _ended(cluster, via, person.token, end)


def _change_password(cluster: Cluster, person: Person, via: Replica) -> str:
    def end() -> None:
        changed = httpx.post(
            f"{via.url}/me/password",
            json={"current_password": person.password, "new_password": secrets.token_urlsafe(12)},
            headers=_bearer(person.token),
        )
        assert changed.status_code == 200, changed.text

    return _ended(cluster, via, person.token, end)


def _ended(cluster: Cluster, via: Replica, credential: str, end: Callable[[], None]) -> str:
    # Every replica has the credential in its cache first: the change must reach them, not a cold lookup.
    assert all(_accepted(replica, credential) for replica in cluster.replicas)
    end()
    return credential


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(_revoke_key, id="key-revoked"),
        pytest.param(_disable, id="person-disabled"),
        pytest.param(_change_password, id="password-changed"),
    ],
)
def test_a_credential_ended_through_one_replica_is_refused_by_the_others_within_a_second(cluster, change):
    via, *others = cluster.replicas
    person = cluster.new_person(via)
    credential = change(cluster, person, via)
    ended_at = time.monotonic()
    assert not _accepted(via, credential)
    refused = _seconds_until_refused(others, credential, ended_at)
    assert set(refused) == {replica.name for replica in others}, f"still accepted after 10 s: {refused}"
    assert max(refused.values()) < INVALIDATION_SECONDS, refused


def test_failed_sign_ins_sent_to_different_replicas_add_up_to_one_limit(cluster):
    person = cluster.new_person(cluster.replicas[0])
    # Counted against this address (nginx's way of naming the client, which the replicas trust from
    # 127.0.0.1): the test's other sign-ins come from 127.0.0.1 itself.
    address = {"X-Forwarded-For": f"198.51.100.{secrets.randbelow(250) + 1}"}

    def sign_in(replica: Replica, password: str) -> httpx.Response:
        return httpx.post(
            f"{replica.url}/login", json={"email": person.email, "password": password}, headers=address
        )

    # No replica sees more than two of them, the limit is four.
    for attempt in range(MAX_FAILURES):
        replica = cluster.replicas[attempt % len(cluster.replicas)]
        assert sign_in(replica, "not the password").status_code == 401
    for replica in cluster.replicas:
        refused = sign_in(replica, "not the password")
        assert refused.status_code == 429, (replica.name, refused.text)
        assert int(refused.headers["retry-after"]) > 0
    # The limit is the pair's: even the right password waits, on a replica that saw a single failure.
    assert sign_in(cluster.replicas[2], person.password).status_code == 429


def test_usage_records_one_per_request_whichever_replica_served_it(cluster):
    one_usage_record_per_request(cluster)


def one_usage_record_per_request(cluster: Cluster, at_once: int = 1) -> None:
    """30 requests through nginx, streamed and not, by one person, `at_once` at a time: every replica served
    some, and each request has exactly one usage record, whichever replica wrote it."""
    person = cluster.new_person(cluster.replicas[0])
    run = secrets.token_hex(4)
    sent = [f"usage-{run}-{number}" for number in range(30)]

    def send(http: httpx.Client, number: int, request_id: str) -> Replica | None:
        headers = {"X-Request-ID": request_id}
        if number % 2:
            answer = http.post("/api/chat", json=chat_body(tokens=3) | {"stream": False}, headers=headers)
        else:
            with http.stream("POST", "/api/chat", json=chat_body(tokens=3), headers=headers) as answer:
                assert json.loads(list(answer.iter_lines())[-1])["done"] is True
        assert answer.status_code == 200
        return cluster.served_by(answer)

    with (
        httpx.Client(base_url=cluster.url, headers=_bearer(person.token), timeout=30) as http,
        concurrent.futures.ThreadPoolExecutor(at_once) as pool,
    ):
        served = Counter(pool.map(lambda numbered: send(http, *numbered), enumerate(sent)))
    assert set(served) == set(cluster.replicas), served
    # Each replica writes its records in the background; reading the report from one writes that one's.
    for replica in cluster.replicas:
        assert httpx.get(f"{replica.url}/admin/usage", headers=cluster.admin_headers()).status_code == 200

    rows = cluster.query(
        "SELECT request_id, count(*) FROM usage_records WHERE request_id LIKE :run GROUP BY request_id",
        {"run": f"usage-{run}-%"},
    )
    assert dict(rows) == dict.fromkeys(sent, 1)
    report = httpx.get(
        f"{cluster.replicas[1].url}/admin/usage",
        params={"user_id": person.id},
        headers=cluster.admin_headers(),
    )
    assert report.json()["totals"]["requests"] == len(sent)


def test_a_replica_killed_during_load_costs_the_other_replicas_clients_nothing(cluster):
    victim = cluster.replicas[1]
    # Streams of about half a second, six at a time: some are always running on each replica.
    with Load(cluster, clients=6, body=chat_body(tokens=10, interval=0.05)) as load:
        time.sleep(1.5)
        killed_at = time.monotonic()
        victim.kill()
        time.sleep(3)
    # Every request nginx gave another replica succeeded, those running there when it died too.
    others = [outcome for outcome in load.outcomes if outcome.replica is not victim]
    assert [outcome for outcome in others if not outcome.ok] == []
    assert any(outcome.started < killed_at < outcome.ended for outcome in others)
    # What failed was the victim's: its streams, and a request nginx sent on a connection it kept to it just
    # as it died (nginx learns of the death as it reads those connections closing, within milliseconds).
    failed = [outcome for outcome in load.outcomes if not outcome.ok]
    assert all(outcome.replica is victim for outcome in failed)
    assert all(outcome.started < killed_at + NOTICED_SECONDS for outcome in failed)
    # From then on nginx sent everything to the survivors (a refused connection is passed on to the next).
    later = [outcome for outcome in load.outcomes if outcome.started > killed_at + NOTICED_SECONDS]
    assert len(later) > 20
    assert all(outcome.ok for outcome in later)
    assert {outcome.replica for outcome in later} == set(cluster.replicas) - {victim}


def test_a_rolling_restart_loses_no_request(cluster):
    # Short requests, four at a time, all through the restarts. Each replica is stopped as a service
    # manager stops it (SIGTERM), started again, and serves through nginx again before the next one's turn.
    with Load(cluster, clients=4, body=chat_body(tokens=2, interval=0.01) | {"stream": False}) as load:
        time.sleep(0.5)
        for replica in cluster.replicas:
            assert replica.stop() == 0
            replica.start()
            load.wait_until_served_by(replica, since=time.monotonic(), timeout=20)
    failed = [outcome for outcome in load.outcomes if not outcome.ok]
    assert failed == []
    assert len(load.outcomes) > 100
