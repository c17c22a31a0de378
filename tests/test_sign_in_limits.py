"""Sign-in limits: what a stranger can and cannot do to other people's sign-ins (issue 9, item 4).

Several client addresses are simulated with X-Forwarded-For from a gateway that trusts 127.0.0.1 as its
proxy (TRUSTED_PROXIES): the path is the real one, as behind nginx. Limits are made small per test.
"""

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from passlib.context import CryptContext

from auth import passwords
from auth.throttle import counting_address
from tests.servers import RunningGateway

pytestmark = pytest.mark.storage

BOB = "bob@example.com"
BOB_PASSWORD = "bobs-long-password"
WRONG = "not-the-password"
PROXY = "127.0.0.1"  # the tests' own address, trusted as a proxy where a test says so


def login(
    gateway: RunningGateway, email: str, password: str, forwarded_for: str | None = None
) -> httpx.Response:
    headers = {"X-Forwarded-For": forwarded_for} if forwarded_for else {}
    return httpx.post(
        f"{gateway.url}/login", json={"email": email, "password": password}, headers=headers, timeout=30
    )


def add_bob(gateway: RunningGateway) -> None:
    gateway.services.users.create(BOB, BOB_PASSWORD, "user")


class CountingContext:
    """Wraps the real Argon2 context: counts verifications, and how many ran at the same time."""

    def __init__(self, real: CryptContext) -> None:
        self._real = real
        self._lock = threading.Lock()
        self.verifications = 0
        self.running = 0
        self.most_at_once = 0

    def verify(self, password: str, password_hash: str) -> bool:
        with self._lock:
            self.verifications += 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            return self._real.verify(password, password_hash)
        finally:
            with self._lock:
                self.running -= 1

    def hash(self, password: str) -> str:
        return self._real.hash(password)


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingContext]:
    context = CountingContext(passwords._context)
    monkeypatch.setattr(passwords, "_context", context)
    yield context


async def _at_once(gateway: RunningGateway, bodies: list[dict]) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=gateway.url, limits=limits, timeout=60) as http:
        return await asyncio.gather(*(http.post("/login", json=body) for body in bodies))


# A shared address: a stranger's failures there


def test_failures_with_made_up_emails_at_one_address_do_not_stop_the_admin_at_another(make_gateway, ollama):
    gateway = make_gateway(trusted_proxies=PROXY, login_max_failures_per_address=10)
    statuses = [login(gateway, f"guess{n}@example.com", WRONG, "10.0.0.1").status_code for n in range(12)]
    assert statuses == [401] * 10 + [429] * 2
    assert login(gateway, gateway.admin_email, gateway.admin_password, "10.0.0.2").status_code == 200


def test_a_person_signs_in_from_their_usual_address_while_a_stranger_sprays_from_it(make_gateway, ollama):
    gateway = make_gateway(trusted_proxies=PROXY, login_max_failures_per_address=5)
    add_bob(gateway)
    assert login(gateway, BOB, BOB_PASSWORD, "10.0.0.1").status_code == 200  # bob's office NAT
    statuses = [login(gateway, f"guess{n}@example.com", WRONG, "10.0.0.1").status_code for n in range(8)]
    assert statuses == [401] * 5 + [429] * 3, "the address is limited for the stranger"
    assert login(gateway, BOB, BOB_PASSWORD, "10.0.0.1").status_code == 200
    # Someone who never signed in from there is limited with the address, the price of sharing it.
    assert login(gateway, gateway.admin_email, gateway.admin_password, "10.0.0.1").status_code == 429


# Forwarded headers are believed only from a configured proxy


def test_a_forged_forwarded_for_escapes_no_limit_and_is_not_logged(make_gateway, ollama, caplog):
    gateway = make_gateway(login_max_failures_per_address=3)  # TRUSTED_PROXIES unset: the default
    with caplog.at_level(logging.INFO):
        statuses = [
            login(gateway, f"guess{n}@example.com", WRONG, f"203.0.113.{n}").status_code for n in range(4)
        ]
    assert statuses == [401, 401, 401, 429]
    failures = [record.getMessage() for record in caplog.records if "sign-in" in record.getMessage()]
    assert len(failures) == 3
    assert all("127.0.0.1" in message and "203.0.113." not in message for message in failures)


def test_the_forwarded_address_is_used_behind_a_trusted_proxy(make_gateway, ollama, caplog):
    gateway = make_gateway(trusted_proxies=PROXY, login_max_failures_per_address=3)
    with caplog.at_level(logging.INFO):
        statuses = [
            login(gateway, f"guess{n}@example.com", WRONG, f"203.0.113.{n}").status_code for n in range(4)
        ]
    assert statuses == [401] * 4, "four addresses, one failure each"
    failures = [record.getMessage() for record in caplog.records if "sign-in" in record.getMessage()]
    assert [message for message in failures if "203.0.113.0" in message]
    assert not [message for message in failures if "127.0.0.1" in message]


# A stranger at one address cannot lock a person out elsewhere


def test_a_strangers_guesses_at_one_address_do_not_lock_the_person_out_at_another(make_gateway, ollama):
    gateway = make_gateway(trusted_proxies=PROXY)
    add_bob(gateway)
    statuses = [login(gateway, BOB, WRONG, "198.51.100.7").status_code for _ in range(12)]
    pair_limit = gateway.settings.login_max_failures
    assert statuses == [401] * pair_limit + [429] * (12 - pair_limit)
    assert login(gateway, BOB, BOB_PASSWORD, "198.51.100.7").status_code == 429
    assert login(gateway, BOB, BOB_PASSWORD, "10.0.0.2").status_code == 200, "bob, never seen there before"


def test_a_botnet_cannot_lock_a_person_out_of_their_usual_address(make_gateway, ollama):
    gateway = make_gateway(trusted_proxies=PROXY, login_max_failures=2, login_max_failures_per_email=6)
    add_bob(gateway)
    assert login(gateway, BOB, BOB_PASSWORD, "10.0.0.1").status_code == 200
    statuses = [login(gateway, BOB, WRONG, f"198.51.100.{n // 2}").status_code for n in range(10)]
    assert statuses == [401] * 6 + [429] * 4, "the email's limit across addresses"
    assert login(gateway, BOB, BOB_PASSWORD, "10.0.0.99").status_code == 429, "a new address is limited"
    assert login(gateway, BOB, BOB_PASSWORD, "10.0.0.1").status_code == 200, "the usual one is not"


def test_ipv6_addresses_count_by_their_48(make_gateway, ollama):
    gateway = make_gateway(trusted_proxies=PROXY, login_max_failures_per_address=3)
    statuses = [
        login(gateway, f"g{n}@example.com", WRONG, f"2001:db8:0:{n + 1:x}::1").status_code for n in range(4)
    ]
    assert statuses == [401, 401, 401, 429], "four /64s of one /48 are one address"
    assert login(gateway, "g@example.com", WRONG, "2001:db8:1::1").status_code == 401, "another /48"


def test_one_ipv6_subscriber_cannot_lock_a_person_out_of_a_new_address(make_gateway, ollama):
    # Ten /64s of one /56, as one home connection holds: not ten strangers, one.
    gateway = make_gateway(trusted_proxies=PROXY)
    add_bob(gateway)
    for subnet in range(10):
        for _ in range(5):
            login(gateway, BOB, WRONG, f"2001:db8:bbbb:ff{subnet:02x}::1")
    assert login(gateway, BOB, BOB_PASSWORD, "2001:db8:cccc:1::10").status_code == 200
    assert login(gateway, BOB, BOB_PASSWORD, "198.51.100.7").status_code == 200


@pytest.mark.parametrize(
    ("address", "counted_as"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1::/48"),
        ("2001:db8:1::", "2001:db8:1::/48"),
        ("unknown", "unknown"),
    ],
)
def test_limits_count_an_ipv6_address_by_its_48(address, counted_as):
    assert counting_address(address) == counted_as


# Attempts are reserved before the password check


@pytest.mark.parametrize("concurrent", [100, None], ids=["reservation-only", "default-concurrency"])
def test_100_simultaneous_guesses_get_at_most_the_pair_limit_of_checks(
    make_gateway, ollama, counting, concurrent
):
    overrides = {"login_max_attempts_per_address": 1000}
    if concurrent is not None:
        overrides["login_max_concurrent_per_address"] = concurrent
    gateway = make_gateway(**overrides)
    counting.verifications = 0
    bodies = [{"email": gateway.admin_email, "password": f"guess-{n}"} for n in range(100)]
    responses = asyncio.run(_at_once(gateway, bodies))
    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) <= {401, 429}
    assert counting.verifications <= gateway.settings.login_max_failures
    assert statuses.count(401) == counting.verifications
    assert all("retry-after" in response.headers for response in responses if response.status_code == 429)


def test_at_most_two_password_checks_run_at_once_per_address(make_gateway, ollama, counting):
    gateway = make_gateway(login_max_attempts_per_address=1000)
    bodies = [{"email": gateway.admin_email, "password": gateway.admin_password}] * 20
    responses = asyncio.run(_at_once(gateway, bodies))
    assert counting.most_at_once <= 2
    refused = [response for response in responses if response.status_code == 429]
    assert refused, "the excess is answered at once"
    assert all(response.headers["retry-after"] == "1" for response in refused)


def test_all_attempts_per_address_are_bounded_successes_too(make_gateway, ollama):
    gateway = make_gateway(login_max_attempts_per_address=4)
    statuses = [login(gateway, gateway.admin_email, gateway.admin_password).status_code for _ in range(5)]
    assert statuses == [200] * 4 + [429]
    refused = login(gateway, gateway.admin_email, gateway.admin_password)
    assert 0 < int(refused.headers["retry-after"]) <= 60


# Nobody can monopolise password hashing


def _admin_waits_while(gateway: RunningGateway, crowd: int) -> tuple[list[float], list[int]]:
    """Seconds the admin's GET /keys take while one user signs in `crowd` times at once, and the statuses
    of those sign-ins."""
    headers = gateway.admin_headers()
    bodies = [{"email": BOB, "password": BOB_PASSWORD}] * crowd
    statuses: list[int] = []

    def sign_in_at_once() -> None:
        statuses.extend(response.status_code for response in asyncio.run(_at_once(gateway, bodies)))

    burst = threading.Thread(target=sign_in_at_once)
    burst.start()
    waits = []
    try:
        time.sleep(0.3)  # the burst is under way
        with httpx.Client(base_url=gateway.url, headers=headers, timeout=60) as admin:
            for _ in range(5):
                start = time.perf_counter()
                assert admin.get("/keys").status_code == 200
                waits.append(time.perf_counter() - start)
                time.sleep(0.2)
    finally:
        burst.join(timeout=120)
    return waits, statuses


# Every limit lifted: all 150 are let through, and wait for their turn to hash.
EVERY_LIMIT_LIFTED = {
    "login_max_failures": 1000,
    "login_max_failures_per_address": 1000,
    "login_max_failures_per_email": 2000,
    "login_max_attempts_per_address": 1000,
    "login_max_concurrent_per_address": 1000,
}


@pytest.mark.parametrize("lifted", [False, True], ids=["default-limits", "every-limit-lifted"])
def test_150_parallel_logins_of_one_user_do_not_stall_others(make_gateway, ollama, lifted):
    gateway = make_gateway(**(EVERY_LIMIT_LIFTED if lifted else {}))
    add_bob(gateway)
    waits, statuses = _admin_waits_while(gateway, 150)
    assert max(waits) < 1.0, waits
    if lifted:
        assert statuses == [200] * 150


# /me/password is counted like a login


def test_guesses_of_the_current_password_are_limited(make_gateway, ollama):
    gateway = make_gateway(login_max_failures=3)
    add_bob(gateway)
    token = login(gateway, BOB, BOB_PASSWORD).json()["access_token"]
    key = httpx.post(
        f"{gateway.url}/keys", json={"name": "leaked"}, headers={"Authorization": f"Bearer {token}"}
    ).json()["key"]
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as thief:

        def change(current: str) -> httpx.Response:
            return thief.post(
                "/me/password", json={"current_password": current, "new_password": "stolen-pass-1"}
            )

        assert [change(f"guess-{n}").status_code for n in range(3)] == [403] * 3
        refused = change(BOB_PASSWORD)
        assert refused.status_code == 429, "not even the right password is checked now"
        assert int(refused.headers["retry-after"]) > 0
    assert login(gateway, BOB, BOB_PASSWORD).status_code == 429, "the same count as logins"
