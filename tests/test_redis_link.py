"""The link to Redis (cluster.redis_link): an unreachable Redis is a degraded mode said at once, once, counted
and without the password; Redis appearing later is noticed without a restart; a Redis restart between two
calls costs nothing. Every Redis here is real and on loopback (tests/redis_server.py).
"""

import asyncio
import logging
import time

import httpx
import pytest

from cluster.redis_link import DEGRADED, REGISTRY, UP, RedisLink, RedisUnavailable, shown_url
from observe.metrics import exposition
from tests.processes import free_port
from tests.redis_server import ThrowawayRedis

PASSWORD = "s3cret-Redis-pw"
# Well under a second, as the issue asks of a request that must learn Redis is gone.
DEGRADED_WITHIN = 1.0
WATCH_SECONDS = 0.05


def _degraded_total() -> float:
    return REGISTRY.get_sample_value("gateway_redis_degraded_total") or 0.0


def _up() -> float | None:
    return REGISTRY.get_sample_value("gateway_redis_up")


def _redis_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "gateway.redis"]


def test_redis_link_to_a_live_redis_is_up(redis_keys):
    async def run() -> tuple[str, str]:
        link = RedisLink(redis_keys.url)
        before = link.health
        await link.start()
        after = link.health
        await link.aclose()
        return before, after

    # Not known to answer before its first call: nothing shared is promised until then.
    assert asyncio.run(run()) == (DEGRADED, UP)
    assert _up() == 1


def test_redis_link_to_a_closed_port_is_degraded_at_once_counted_and_logged_once_without_the_password(caplog):
    caplog.set_level(logging.INFO, logger="gateway.redis")
    url = f"redis://gateway:{PASSWORD}@127.0.0.1:{free_port()}/0"
    counted = _degraded_total()

    async def run() -> tuple[float, str, str]:
        link = RedisLink(url)
        started = time.monotonic()
        await link.start()
        took = time.monotonic() - started
        with pytest.raises(RedisUnavailable) as raised:
            await link.call(link.client.set("unused:probe", "1", px=1000))
        await link.check()
        health = link.health
        await link.aclose()
        return took, health, str(raised.value)

    took, health, refusal = asyncio.run(run())
    assert took < DEGRADED_WITHIN
    assert health == DEGRADED
    assert _up() == 0
    # Three failed calls, one loss of Redis: counted once, said once.
    assert _degraded_total() == counted + 1
    lines = _redis_lines(caplog)
    assert len(lines) == 1, lines
    assert "does not answer" in lines[0] and "degraded mode" in lines[0]
    assert "127.0.0.1" in lines[0]
    for text in [*lines, refusal, caplog.text]:
        assert PASSWORD not in text
        assert "gateway:" not in text  # nor the user's name


def test_redis_link_recovers_when_redis_starts_on_that_port_without_a_restart(caplog):
    caplog.set_level(logging.INFO, logger="gateway.redis")
    port = free_port()

    async def run() -> tuple[str, str, bool]:
        link = RedisLink(f"redis://127.0.0.1:{port}/0", check_seconds=WATCH_SECONDS)
        await link.start()
        before = link.health
        server = await asyncio.to_thread(ThrowawayRedis, port)
        try:
            # Nobody calls: the link's own watch notices.
            for _ in range(100):  # 5 s at most
                if link.up:
                    break
                await asyncio.sleep(WATCH_SECONDS)
            after = link.health
            got = bool(await link.call(link.client.set("recovered:probe", "1", px=1000)))
        finally:
            await link.aclose()
            await asyncio.to_thread(server.stop)
        return before, after, got

    assert asyncio.run(run()) == (DEGRADED, UP, True)
    assert _up() == 1
    lines = _redis_lines(caplog)
    assert len(lines) == 2, lines
    assert "does not answer" in lines[0]
    assert "answers again" in lines[1]


def test_redis_link_a_redis_restart_between_two_calls_is_not_a_degraded_mode(caplog):
    """The pool's connection to the old server fails once and is replaced (one retry): the call succeeds."""
    caplog.set_level(logging.INFO, logger="gateway.redis")
    port = free_port()
    server = ThrowawayRedis(port)
    counted = _degraded_total()

    async def run() -> tuple[bool, bool]:
        nonlocal server
        link = RedisLink(server.url)
        try:
            first = await link.call(link.client.set("restart-probe", 1))
            await asyncio.to_thread(server.stop)
            server = await asyncio.to_thread(ThrowawayRedis, port)
            second = await link.call(link.client.set("restart-probe", 2))
        finally:
            await link.aclose()
        return bool(first), bool(second)

    try:
        assert asyncio.run(run()) == (True, True)
    finally:
        server.stop()
    assert _degraded_total() == counted
    assert not [line for line in _redis_lines(caplog) if "does not answer" in line]


def test_redis_link_metrics_are_in_the_gateways_exposition(redis_keys):
    async def run() -> None:
        link = RedisLink(redis_keys.url)
        await link.start()
        await link.aclose()

    asyncio.run(run())
    text = exposition().decode()
    assert "\ngateway_redis_up 1.0\n" in text
    assert "\ngateway_redis_degraded_total " in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("redis://gateway:pw@cache.internal:6379/0", "redis://cache.internal:6379/0", id="user"),
        pytest.param("rediss://:pw@cache.internal", "rediss://cache.internal", id="password-only"),
        pytest.param("redis://cache.internal/2?password=pw", "redis://cache.internal/2", id="in-the-query"),
        pytest.param("redis://:pw@[::1]:6380", "redis://[::1]:6380", id="ipv6"),
        pytest.param("unix://:pw@/run/redis/redis.sock?db=1", "unix:///run/redis/redis.sock", id="socket"),
    ],
)
def test_redis_link_shows_redis_without_credentials(url, shown):
    assert shown_url(url) == shown


def _scraped(gateway, name: str) -> float | None:
    text = httpx.get(f"{gateway.url}/metrics", headers=gateway.admin_headers()).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def test_a_gateway_with_redis_url_reports_redis_up_on_its_metrics(make_gateway, redis_keys):
    gateway = make_gateway(redis_url=redis_keys.url, redis_prefix=redis_keys.prefix)
    assert gateway.services.redis is not None and gateway.services.redis.up
    assert _scraped(gateway, "gateway_redis_up") == 1


def test_a_gateway_whose_redis_does_not_answer_still_serves_and_reports_degraded(make_gateway, caplog):
    caplog.set_level(logging.INFO, logger="gateway.redis")
    counted = _degraded_total()
    url = f"redis://gateway:{PASSWORD}@127.0.0.1:{free_port()}/0"
    gateway = make_gateway(redis_url=url)
    assert httpx.get(f"{gateway.url}/health").status_code == 200
    assert _scraped(gateway, "gateway_redis_up") == 0
    assert _degraded_total() == counted + 1
    lines = _redis_lines(caplog)
    assert len(lines) == 1 and "127.0.0.1" in lines[0] and PASSWORD not in lines[0]
