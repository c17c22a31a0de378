"""Three gateway replicas behind nginx on one Postgres database and one Redis (tests/cluster.py), in front of
two test Ollama hosts that run two requests at once each, as they are configured to (OLLAMA_PARALLEL):
issue 14's promises, seen from where a user or an Ollama host would notice them. No host is ever sent more
than its slots by the replicas together; a person's chat on one replica is not stuck behind someone else's
batch burst on another; a replica killed with SIGKILL gives its slots back within LEASE_SECONDS and costs
the other replicas' clients nothing; a Redis restarted under load means degraded mode (logged, counted, the
documented share of the slots), then recovery without a restart and no lease left behind; and one usage
record per request.

The Redis is a throwaway one of this module's own (tests/redis_server.py), since one test stops it and
starts it again on its port. Postgres is needed, so these run in `make test`'s Postgres pass only.
"""

import concurrent.futures
import threading
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial

import httpx
import pytest
import redis

from tests.cluster import Cluster, Load, Replica, running_cluster
from tests.fake_ollama import FakeOllama
from tests.redis_server import ThrowawayRedis
from tests.streams import chat_body
from tests.test_cluster import one_usage_record_per_request

pytestmark = [pytest.mark.storage, pytest.mark.postgres_only]

MODEL = "llama3.2:1b"
REPLICAS = 3
SLOTS = 2  # per host, told to the replicas and kept by the hosts themselves
LEASE_SECONDS = 1.5
# Scheduling slack on this loaded two-core machine, on top of what is promised.
SLACK = 0.5
# While Redis does not answer, each replica runs at most its share of each host's slots, max(1, SLOTS //
# replicas last seen), or the shared requests it already ran there when Redis went, if more (they finish):
# a host runs at most its slots plus the other replicas' shares while those run, the replicas' shares then
# (fleet.shared_scheduler). When Redis is back, the slots again, once every replica has renewed.
SHARE = max(1, SLOTS // REPLICAS)
DEGRADED_MOST = REPLICAS * SHARE
GOING_DEGRADED_MOST = SLOTS + (REPLICAS - 1) * SHARE
# The keys of the queue and the slots (fleet.queue_scripts): all of them expire unless renewed.
HELD = ("slots:", "hostrun:", "modelrun:", "userrun:", "keyrun:", "userwait:", "keywait:", "waiter:", "line:")
HELD_TOO = ("people:", "queued")
PREFIX = "gateway:"


class OwnRedis:
    """This module's Redis, which a test may stop and start again on the same port."""

    def __init__(self) -> None:
        self.server: ThrowawayRedis | None = ThrowawayRedis()
        self.port = self.server.port
        self.url = self.server.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def start(self) -> None:
        if self.server is None:
            self.server = ThrowawayRedis(port=self.port)

    def held_keys(self) -> set[str]:
        """The queue's and the slots' keys in Redis now (what outlives every request by design left out)."""
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        try:
            found = {key.decode().removeprefix(PREFIX) for key in client.scan_iter(match=f"{PREFIX}*")}
        finally:
            client.close()
        return {key for key in found if key.startswith(HELD) or key.startswith(HELD_TOO)}


@pytest.fixture(scope="module")
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def started(tmp_path_factory, own_redis: OwnRedis) -> Iterator[Cluster]:
    folder = tmp_path_factory.mktemp("cluster-redis")
    settings = {"LEASE_SECONDS": str(LEASE_SECONDS)}
    with running_cluster(
        folder,
        replicas=REPLICAS,
        hosts=2,
        slots=SLOTS,
        host_slots=SLOTS,
        redis_url=own_redis.url,
        settings=settings,
    ) as cluster:
        yield cluster


@pytest.fixture
def cluster(started: Cluster, own_redis: OwnRedis) -> Cluster:
    """The cluster with Redis and all three replicas up (a test before may have stopped one or the other),
    nothing running on the hosts, and the hosts' counters at zero."""
    own_redis.start()
    started.start_stopped()
    deadline = time.monotonic() + 10
    for host in started.hosts:
        host.wait_until(partial(_idle, host), timeout=10)
    while not all(started.metrics(replica).get("gateway_redis_up") == 1 for replica in started.replicas):
        assert time.monotonic() < deadline, "a replica does not reach Redis"
        time.sleep(0.1)
    for host in started.hosts:
        host.reset()
    # nginx leaves a replica it saw fail alone for 10 s (deploy/nginx-replicas.conf): every replica is in use
    # again before the test begins.
    served: set[Replica | None] = set()
    deadline = time.monotonic() + 15
    while served != set(started.replicas):
        assert time.monotonic() < deadline, f"nginx sends nothing to some replicas: {served}"
        served.add(started.served_by(httpx.get(f"{started.url}/health", timeout=5)))
        time.sleep(0.05)
    return started


def _idle(host: FakeOllama) -> bool:
    return _running(host) == 0


def _running(host: FakeOllama) -> int:
    stats = host.model_stats(MODEL)
    return stats.in_flight + stats.queued


class Sampler:
    """What the hosts run (or hold in their hidden queues), together and each, every few milliseconds."""

    def __init__(self, cluster: Cluster) -> None:
        self.hosts = cluster.hosts
        self.samples: list[tuple[float, int]] = []
        self.each: list[tuple[float, int]] = []  # the most any one host was sent
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _sample(self) -> None:
        while not self._stop.is_set():
            running = [_running(host) for host in self.hosts]
            self.samples.append((time.monotonic(), sum(running)))
            self.each.append((time.monotonic(), max(running)))
            time.sleep(0.005)

    def most(self, since: float, until: float) -> int:
        """The most any host was seen sent at once between `since` and `until`."""
        return max((most for at, most in self.each if since <= at <= until), default=0)


def test_redis_no_host_is_sent_more_than_its_slots_by_the_replicas_together(cluster):
    # Sixteen clients through nginx, streams of about 0.15 s: the replicas always have more than the
    # four slots' worth of requests to send.
    with Load(cluster, clients=16, body=chat_body(tokens=5, interval=0.03)) as load:
        time.sleep(3)
    assert [outcome.detail for outcome in load.outcomes if not outcome.ok] == []
    served = Counter(outcome.replica for outcome in load.outcomes)
    assert set(served) == set(cluster.replicas), served
    assert min(served.values()) > 10, served
    # Every slot was used, and no host ever had a request waiting in its own queue.
    assert cluster.most_sent(MODEL) == {host.url: SLOTS for host in cluster.hosts}


def _first_byte(replica: Replica, headers: dict[str, str], body: dict) -> float:
    started = time.monotonic()
    with httpx.stream("POST", f"{replica.url}/api/chat", json=body, headers=headers, timeout=60) as answer:
        assert answer.status_code == 200
        lines = answer.iter_lines()
        next(lines)
        first = time.monotonic() - started
        for _ in lines:
            pass
    return first


def test_redis_a_chat_on_one_replica_is_not_stuck_behind_a_batch_burst_on_another(cluster):
    first, second, _ = cluster.replicas
    ada, bob = cluster.new_person(first), cluster.new_person(second)
    job = chat_body(tokens=8, interval=0.05)  # about 0.4 s each
    batch = ada.headers | {"X-Priority": "batch"}

    def burst_request() -> tuple[int, float]:
        answer = httpx.post(f"{first.url}/api/chat", json=job | {"stream": False}, headers=batch, timeout=60)
        return answer.status_code, time.monotonic()

    alone = _first_byte(second, bob.headers, job)
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        # Eight rounds of the four slots: over 3 s of work, all sent to the first replica at once.
        burst = [pool.submit(burst_request) for _ in range(32)]
        time.sleep(0.3)  # all in: four running, twenty-eight waiting
        waits = []
        for _ in range(3):
            last_chat = time.monotonic()
            waits.append(_first_byte(second, bob.headers, job))
            time.sleep(0.1)
        ended = [future.result() for future in burst]
    assert [status for status, _ in ended] == [200] * 32
    # Each chat waited for one running request to end at most, never for the burst queued before it...
    assert max(waits) < alone + 0.4 + 0.3, (alone, waits)
    # ... which still had requests waiting when the last chat was sent.
    assert max(at for _, at in ended) > last_chat + 0.4 + 0.3, "the burst was over: nothing to show"


def _inflight_on(cluster: Cluster, replica: Replica) -> int:
    hosts = httpx.get(f"{replica.url}/admin/hosts", headers=cluster.admin_headers(), timeout=5).json()
    return sum(host["capacity"].get(MODEL, {}).get("inflight", 0) for host in hosts)


def test_redis_a_replica_killed_during_load_gives_its_slots_back_within_the_lease(cluster):
    victim = cluster.replicas[1]
    full = SLOTS * len(cluster.hosts)
    # Streams of about half a second, twelve clients through nginx: every slot is always wanted.
    with (
        Load(cluster, clients=12, body=chat_body(tokens=10, interval=0.05)) as load,
        Sampler(cluster) as sampler,
    ):
        time.sleep(1.5)
        deadline = time.monotonic() + 5
        while _inflight_on(cluster, victim) == 0:  # it holds slots when it dies
            assert time.monotonic() < deadline, f"{victim.name} never ran anything"
            time.sleep(0.01)
        victim.kill()
        killed_at = time.monotonic()
        time.sleep(LEASE_SECONDS + 2)
    after = [(at - killed_at, running) for at, running in sampler.samples if at > killed_at]
    # Its streams died with it, and the hosts ended them: their slots stood empty, held by its leases...
    dip = next((at for at, running in after if running < full), None)
    assert dip is not None and dip < 0.5, after[:20]
    # ... until the leases expired, and the hosts were given requests for every slot again.
    back = next((at for at, running in after if at > dip and running == full), None)
    assert back is not None, after[-20:]
    assert back <= LEASE_SECONDS + SLACK, f"the slots came back {back:.2f} s after the kill"
    # Every request another replica served succeeded, those running when it died too.
    others = [outcome for outcome in load.outcomes if outcome.replica is not victim]
    assert [outcome.detail for outcome in others if not outcome.ok] == []
    assert any(outcome.started < killed_at < outcome.ended for outcome in others)
    assert cluster.most_sent(MODEL) == {host.url: SLOTS for host in cluster.hosts}


def test_redis_restarted_during_load_degrades_then_recovers_and_leaves_no_lease(cluster, own_redis):
    replicas = cluster.replicas
    pids = [replica.pid for replica in replicas]
    before = {replica.name: cluster.metrics(replica) for replica in replicas}
    stream = 0.3  # seconds, each request
    with (
        Load(cluster, clients=12, body=chat_body(tokens=6, interval=0.05)) as load,
        Sampler(cluster) as sampler,
    ):
        time.sleep(1)
        own_redis.stop()
        stopped_at = time.monotonic()
        time.sleep(2.5)
        during = {replica.name: cluster.metrics(replica) for replica in replicas}
        own_redis.start()
        back_at = time.monotonic()
        deadline = back_at + 10
        while not all(cluster.metrics(replica).get("gateway_redis_up") == 1 for replica in replicas):
            assert time.monotonic() < deadline, "a replica did not see Redis come back"
            time.sleep(0.05)
        recovered = time.monotonic() - back_at
        time.sleep(0.5)  # what was admitted locally before has started
        admitted = {replica.name: cluster.metrics(replica) for replica in replicas}
        time.sleep(1.5)
        later = {replica.name: cluster.metrics(replica) for replica in replicas}
    ended_at = time.monotonic()

    # Nobody noticed: every request succeeded, those sent while Redis was down too.
    assert [outcome.detail for outcome in load.outcomes if not outcome.ok] == []
    assert sum(1 for outcome in load.outcomes if stopped_at < outcome.started < back_at) > 20
    assert [replica.pid for replica in replicas] == pids
    for replica in replicas:
        name = replica.name
        # Degraded mode, said and counted on every replica...
        assert during[name]["gateway_redis_up"] == 0
        assert (
            during[name]["gateway_redis_degraded_total"] == before[name]["gateway_redis_degraded_total"] + 1
        )
        assert (
            during[name]["gateway_degraded_admissions_total"]
            > before[name]["gateway_degraded_admissions_total"]
        )
        # ... then the shared queue again, without a restart: no more local admissions.
        assert later[name]["gateway_redis_up"] == 1
        assert (
            later[name]["gateway_degraded_admissions_total"]
            == admitted[name]["gateway_degraded_admissions_total"]
        )
    assert recovered < 2, f"{recovered:.2f} s"
    # The hosts were sent no more than degraded mode allows: the slots and the other replicas' shares while
    # what ran when Redis went still ran, the replicas' shares after that, the slots once Redis was back and
    # every replica had renewed what it ran.
    most_sent = cluster.most_sent(MODEL)
    assert all(most <= GOING_DEGRADED_MOST for most in most_sent.values()), most_sent
    assert sampler.most(stopped_at + stream + SLACK, back_at) <= DEGRADED_MOST
    assert sampler.most(back_at + LEASE_SECONDS / 3 + SLACK, ended_at) <= SLOTS
    # No lease and no waiter is left once nothing runs: all gone within the lease.
    while own_redis.held_keys() and time.monotonic() < ended_at + LEASE_SECONDS + SLACK:
        time.sleep(0.05)
    assert own_redis.held_keys() == set()


def test_redis_usage_records_one_per_request_whichever_replica_served_it(cluster):
    one_usage_record_per_request(cluster, at_once=6)


QUOTA_REQUESTS = 5


def test_redis_a_quota_is_one_budget_for_the_replicas_together(cluster):
    """A person with a quota of 5 requests a day sends 30 at once, spread by nginx over the three replicas:
    exactly 5 reach Ollama; the others are refused 429 with Retry-After, by whichever replica they landed on.
    Each replica counting alone would let up to 15 through."""
    ada = cluster.new_person(cluster.replicas[0])
    quota = {"quota": {"period": "day", "requests": QUOTA_REQUESTS, "tokens": None, "slot_seconds": None}}
    set_quota = httpx.patch(
        f"{cluster.replicas[1].url}/admin/users/{ada.id}", json=quota, headers=cluster.admin_headers()
    )
    assert set_quota.status_code == 200, set_quota.text
    body = {**chat_body(tokens=3, interval=0.05), "stream": False}

    def ask(_: int) -> httpx.Response:
        return httpx.post(f"{cluster.url}/api/chat", json=body, headers=ada.headers, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        answers = list(pool.map(ask, range(30)))
    statuses = Counter(answer.status_code for answer in answers)
    assert statuses == {200: QUOTA_REQUESTS, 429: 30 - QUOTA_REQUESTS}, statuses
    served = {cluster.served_by(answer) for answer in answers}
    assert len(served) == REPLICAS, "nginx spread them over every replica"
    refused = [answer for answer in answers if answer.status_code == 429]
    assert all(int(answer.headers["Retry-After"]) >= 1 for answer in refused)
    assert all("limit of 5 requests" in answer.json()["error"] for answer in refused)
    # And afterwards, on any replica: the day's budget is spent.
    for replica in cluster.replicas:
        again = httpx.post(f"{replica.url}/api/chat", json=body, headers=ada.headers, timeout=60)
        assert again.status_code == 429, (replica, again.text)
