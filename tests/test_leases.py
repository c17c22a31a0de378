"""Slot leases (cluster.leases) on a real Redis: replicas together never hold more than a (host, model)'s
slots, a replica killed with SIGKILL gives its slots back within the lease and not before, renewal keeps a
running request's slot, and releasing is harmless twice and frees a slot at once.

"Replicas" here are real processes (`tests/lease_holder.py`); every test uses a key prefix of its own.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import cast

import pytest
import redis

from cluster.leases import SlotLeases
from cluster.redis_link import RedisLink
from tests import lease_holder
from tests.processes import REPO
from tests.redis_server import KeySpace

HOST = lease_holder.HOST
MODEL = lease_holder.MODEL
SHORT_LEASE = 1.0
# What a loaded machine may add to a lease's expiry before a test sees the slot free: a poll, a round trip.
SLACK = 0.5
PROCESS_TIMEOUT = 30


async def _book(keys: KeySpace, lease_seconds: float = SHORT_LEASE) -> tuple[RedisLink, SlotLeases]:
    link = RedisLink(keys.url)
    return link, SlotLeases(link, keys.prefix, lease_seconds)


async def _close(link: RedisLink, book: SlotLeases) -> None:
    await book.aclose()
    await link.aclose()


def _redis(keys: KeySpace) -> redis.Redis:
    return redis.Redis.from_url(keys.url, socket_timeout=5)


def _holder_process(mode: str, keys: KeySpace, *arguments: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.lease_holder", mode, keys.url, keys.prefix, *map(str, arguments)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_leases_many_acquirers_in_one_process_never_hold_more_than_the_limit(redis_keys):
    limit, tasks, rounds = 3, 40, 15

    async def run() -> tuple[int, int]:
        link, book = await _book(redis_keys, lease_seconds=10)
        holding = most = acquired = 0

        async def one_task() -> None:
            nonlocal holding, most, acquired
            for _ in range(rounds):
                holder = book.new_holder()
                if not await book.acquire(HOST, MODEL, limit, holder):
                    await asyncio.sleep(0.001)
                    continue
                holding += 1
                most = max(most, holding)
                acquired += 1
                await asyncio.sleep(0.003)
                holding -= 1
                await book.release(HOST, MODEL, holder)

        await asyncio.gather(*(one_task() for _ in range(tasks)))
        await _close(link, book)
        return most, acquired

    most, acquired = asyncio.run(run())
    assert most == limit  # reached, never passed
    assert acquired >= limit


def test_leases_acquirers_in_three_processes_never_hold_more_than_the_limit_together(redis_keys):
    limit, tasks, rounds = 4, 8, 60
    processes = [_holder_process("contend", redis_keys, limit, tasks, rounds) for _ in range(3)]
    client = _redis(redis_keys)
    try:
        client.set(lease_holder.go_key(redis_keys.prefix), 1)
        outputs = [process.communicate(timeout=PROCESS_TIMEOUT) for process in processes]
        most = int(client.get(lease_holder.most_key(redis_keys.prefix)) or 0)
        still_holding = int(client.get(lease_holder.holding_key(redis_keys.prefix)) or 0)
    finally:
        for process in processes:
            process.kill()
            process.communicate(timeout=PROCESS_TIMEOUT)
        client.close()
    for process, (_out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
    tallies = [json.loads(out) for out, _ in outputs]
    # Every process got slots and was refused some: they really contended.
    assert all(tally["acquired"] > 0 and tally["refused"] > 0 for tally in tallies), tallies
    assert most == limit, f"{most} held at once with {limit} slots"
    assert still_holding == 0


def test_leases_of_a_holder_killed_with_sigkill_come_back_within_the_lease_and_not_before(redis_keys):
    limit = 2
    holder = _holder_process("hold", redis_keys, limit, SHORT_LEASE)
    client = _redis(redis_keys)
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held", holder.stderr.read() if holder.stderr else ""
        # Held past their first expiry: the holder's renewer keeps them.
        time.sleep(SHORT_LEASE * 1.5)
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        holder.wait(timeout=PROCESS_TIMEOUT)

        async def free_again() -> tuple[list[float], float, float]:
            link, book = await _book(redis_keys)
            # (holder, expiry) pairs
            members = cast(
                list[tuple[bytes, float]],
                await link.client.zrange(book.key(HOST, MODEL), 0, -1, withscores=True),
            )
            expiries = [score for _, score in members]
            seconds, microseconds = await link.client.time()
            now_ms = seconds * 1000 + microseconds / 1000
            assert await book.count(HOST, MODEL) == limit  # not before: the dead process's leases still count
            assert not await book.acquire(HOST, MODEL, limit, book.new_holder())
            for _ in range(round((SHORT_LEASE + SLACK + 2) / 0.02)):  # bounded: past that, the assert says
                if await book.count(HOST, MODEL) < limit:
                    break
                await asyncio.sleep(0.02)
            freed = time.monotonic() - killed
            seconds, microseconds = await link.client.time()
            freed_at_ms = seconds * 1000 + microseconds / 1000
            got = await book.acquire(HOST, MODEL, limit, book.new_holder())
            await _close(link, book)
            assert got
            return [expiry - now_ms for expiry in expiries], freed, freed_at_ms - min(expiries)

        remaining_ms, freed, freed_after_expiry_ms = asyncio.run(free_again())
    finally:
        holder.kill()
        holder.communicate(timeout=PROCESS_TIMEOUT)  # and its pipes closed
        client.close()
    # Every lease had at most LEASE_SECONDS left when its holder died...
    assert all(0 < remaining <= SHORT_LEASE * 1000 for remaining in remaining_ms), remaining_ms
    # ...and the first slot came back once its lease expired on Redis's clock, not before, within the lease.
    assert freed_after_expiry_ms >= 0
    assert freed <= SHORT_LEASE + SLACK


def test_leases_renewal_keeps_a_lease_well_past_its_expiry(redis_keys):
    async def run() -> tuple[int, bool, int]:
        link, book = await _book(redis_keys)
        assert await book.acquire(HOST, MODEL, 1, book.new_holder())
        await asyncio.sleep(SHORT_LEASE * 3)
        live = await book.count(HOST, MODEL)
        taken = await book.acquire(HOST, MODEL, 1, book.new_holder())
        held = book.held
        await _close(link, book)
        return live, taken, held

    live, taken, held = asyncio.run(run())
    assert (live, taken, held) == (1, False, 1)


def test_leases_release_is_idempotent(redis_keys):
    async def run() -> list[object]:
        link, book = await _book(redis_keys)
        holder = book.new_holder()
        await book.acquire(HOST, MODEL, 1, holder)
        results: list[object] = [
            await book.release(HOST, MODEL, holder),
            await book.release(HOST, MODEL, holder),
            await book.release(HOST, MODEL, book.new_holder()),  # never held
            await book.count(HOST, MODEL),
            book.held,
            await link.client.keys(f"{redis_keys.prefix}*"),  # the set went with its last lease
        ]
        await _close(link, book)
        return results

    assert asyncio.run(run()) == [True, False, False, 0, 0, []]


def test_leases_releasing_frees_the_slot_for_a_waiting_acquirer_at_once(redis_keys):
    async def run() -> float:
        link, book = await _book(redis_keys, lease_seconds=10)
        first = book.new_holder()
        assert await book.acquire(HOST, MODEL, 1, first)

        async def waiter() -> float:
            holder = book.new_holder()
            for _ in range(500):  # 5 s at most
                if await book.acquire(HOST, MODEL, 1, holder):
                    return time.monotonic()
                await asyncio.sleep(0.01)
            raise AssertionError("the slot never came free")

        waiting = asyncio.create_task(waiter())
        await asyncio.sleep(0.2)
        assert not waiting.done()
        released = time.monotonic()
        await book.release(HOST, MODEL, first)
        got = await waiting
        await _close(link, book)
        return got - released

    # Not the lease's 10 s: as soon as the waiter asks again.
    assert asyncio.run(run()) < 0.5


def test_leases_a_retried_acquire_finds_its_own_lease_instead_of_a_second(redis_keys):
    async def run() -> tuple[bool, bool, int]:
        link, book = await _book(redis_keys)
        holder = book.new_holder()
        results = (
            await book.acquire(HOST, MODEL, 2, holder),
            await book.acquire(HOST, MODEL, 2, holder),
            await book.count(HOST, MODEL),
        )
        await _close(link, book)
        return results

    assert asyncio.run(run()) == (True, True, 1)


def test_leases_expire_by_redis_clock(redis_keys):
    """A lease whose expiry, on Redis's clock, has passed no longer counts and no longer takes a slot;
    one still ahead does."""

    async def run() -> tuple[int, int, bool]:
        link, book = await _book(redis_keys)
        key = book.key(HOST, MODEL)
        seconds, microseconds = await link.client.time()
        now_ms = seconds * 1000 + microseconds // 1000
        await link.client.zadd(key, {"someone-gone": now_ms - 1, "someone-running": now_ms + 60_000})
        live = await book.count(HOST, MODEL)
        stored = await link.client.zcard(key)
        taken = await book.acquire(HOST, MODEL, 2, book.new_holder())
        await _close(link, book)
        return live, stored, taken

    assert asyncio.run(run()) == (1, 2, True)


def test_leases_lost_with_redis_data_are_reported_and_not_brought_back(redis_keys):
    """As after a Redis restart without persistence: the renewal says which leases are gone and does not
    write them back (their slots may have been given to others meanwhile)."""

    async def run() -> tuple[int, int, int]:
        link, book = await _book(redis_keys, lease_seconds=10)
        holders = [book.new_holder() for _ in range(2)]
        for holder in holders:
            assert await book.acquire(HOST, MODEL, 2, holder)
        await link.client.delete(book.key(HOST, MODEL))
        lost = await book.renew()
        results = len(lost), await book.count(HOST, MODEL), book.held
        await _close(link, book)
        return results

    assert asyncio.run(run()) == (2, 0, 0)


def test_leases_holders_are_unique_across_processes_and_keys_stay_under_the_prefix(redis_keys):
    async def run() -> tuple[set[str], list[str], int]:
        link, book = await _book(redis_keys)
        other = SlotLeases(link, redis_keys.prefix, SHORT_LEASE)
        holders = {book.new_holder() for _ in range(100)} | {other.new_holder() for _ in range(100)}
        await book.acquire("http://gpu:11434", MODEL, 1, book.new_holder())
        keys = await link.client.keys(f"{redis_keys.prefix}*")
        ttl = await link.client.pttl(book.key("http://gpu:11434", MODEL))
        await _close(link, book)
        return holders, [key.decode() if isinstance(key, bytes) else key for key in keys], ttl

    holders, ours, ttl = asyncio.run(run())
    assert len(holders) == 200
    assert len(ours) == 1
    assert ours[0] == f"{redis_keys.prefix}slots:http%3A%2F%2Fgpu%3A11434:{MODEL}"
    assert 0 < ttl <= SHORT_LEASE * 1000  # the set expires with its last lease


@pytest.mark.parametrize("limit", [1, 5])
def test_leases_count_sees_every_holder(redis_keys, limit):
    async def run() -> int:
        link, book = await _book(redis_keys, lease_seconds=10)
        for _ in range(limit + 2):
            await book.acquire(HOST, MODEL, limit, book.new_holder())
        live = await book.count(HOST, MODEL)
        await _close(link, book)
        return live

    assert asyncio.run(run()) == limit
