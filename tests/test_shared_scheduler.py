"""The fair queue and slots shared through Redis (fleet.shared_scheduler), on a real Redis: several
replicas together never run more than a host's slots, a slot freed on one goes to a waiter on another at
once, fairness, bands and caps hold across them, nothing is left behind by cancellations and timeouts, a
replica killed with SIGKILL gives its slots back within the lease and its waiters block nobody, and without
Redis each replica admits with its share of the slots, then goes back to the shared queue.

Most "replicas" are SharedScheduler instances in one process, each with a link (and a subscription) of its
own; the SIGKILL and contention tests run real processes (`tests/shared_replica.py`).
"""

import asyncio
import concurrent.futures
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import redis

from cluster.redis_link import REGISTRY, RedisLink
from fleet.admission import Fleet, SharedQueue
from fleet.hosts import Hosts
from fleet.scheduler import Ask, Band, Candidate, Grant, Limits, Refused, Scheduler
from fleet.shared_scheduler import SharedGrant, SharedScheduler
from tests import shared_replica
from tests.processes import REPO
from tests.redis_server import KeySpace, ThrowawayRedis
from tests.streams import chat_body
from upstream.client import UpstreamTimeouts

BATCH = Band.BATCH
LEASE = 1.0
SLACK = 0.5
PROCESS_TIMEOUT = 30
# Keys that outlive every request by design: the arrival counter and the models' costs.
LASTING = {"order", "cost"}


def run(test: Callable[[], Coroutine[Any, Any, None]], timeout: float = 15) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=timeout))


def one_host(slots: int | None) -> Callable[[str], list[Candidate]]:
    return lambda model: [Candidate("h1", loaded=True, slots=slots)]


@asynccontextmanager
async def replicas(
    keys: KeySpace,
    count: int,
    candidates: Callable[[str], list[Candidate]],
    limits: Limits | None = None,
    url: str | None = None,
) -> AsyncIterator[list[SharedScheduler]]:
    links = [RedisLink(url or keys.url, check_seconds=0.1) for _ in range(count)]
    schedulers = [SharedScheduler(candidates, link, keys.prefix, LEASE, limits) for link in links]
    try:
        for link, scheduler in zip(links, schedulers, strict=True):
            await link.start()
            scheduler.start()
        for scheduler in schedulers:
            await scheduler.renew()  # every replica registered: each knows how many there are
        yield schedulers
    finally:
        for scheduler in schedulers:
            await scheduler.aclose()
        for link in links:
            await link.aclose()


def start(scheduler: SharedScheduler, ask: Ask) -> asyncio.Task[Grant]:
    return asyncio.get_running_loop().create_task(scheduler.acquire(ask))


async def queued(scheduler: SharedScheduler, ask: Ask) -> asyncio.Task[Grant]:
    """`ask` waiting in the shared queue (its enqueue answered), so arrivals keep the order they are made."""
    before = scheduler.waiting(ask.model)[ask.band.label]
    task = start(scheduler, ask)
    for _ in range(500):
        await asyncio.sleep(0.002)
        if task.done() or scheduler.waiting(ask.model)[ask.band.label] > before:
            break
    await asyncio.sleep(0.01)
    return task


async def our_keys(keys: KeySpace, url: str | None = None) -> set[str]:
    client = redis.asyncio.Redis.from_url(url or keys.url)
    try:
        found = [key.decode() async for key in client.scan_iter(match=f"{keys.prefix}*")]
    finally:
        await client.aclose()
    return {key.removeprefix(keys.prefix) for key in found}


async def settle(*schedulers: SharedScheduler) -> None:
    """The give-backs and withdrawals under way have reached Redis."""
    for _ in range(100):
        if not any(scheduler._tasks for scheduler in schedulers):
            return
        await asyncio.sleep(0.01)


async def live_slots(link: RedisLink, prefix: str, host: str, model: str) -> int:
    """The requests Redis counts running on (host, model): the members of its slot set not yet expired, by
    Redis's clock (fleet.queue_scripts names the set)."""
    seconds, micros = await link.client.time()
    now_ms = seconds * 1000 + micros // 1000
    return await link.client.zcount(f"{prefix}slots:{quote(host, safe='')}:{model}", f"({now_ms}", "+inf")


def test_shared_replicas_never_run_more_than_a_hosts_slots_together(redis_keys):
    async def test() -> None:
        async with replicas(redis_keys, 3, one_host(2)) as group:
            running = most = granted = 0

            async def one_person(scheduler: SharedScheduler, user: str) -> None:
                nonlocal running, most, granted
                for _ in range(6):
                    grant = await scheduler.acquire(Ask(user, "m"))
                    running += 1
                    most = max(most, running)
                    granted += 1
                    await asyncio.sleep(0.003)
                    running -= 1
                    scheduler.release(grant, slot_seconds=0.003)

            await asyncio.gather(*(one_person(group[n % 3], f"u{n}") for n in range(12)))
            await settle(*group)
            assert (most, granted) == (2, 72)
            assert await live_slots(group[0]._link, redis_keys.prefix, "h1", "m") == 0
        assert await our_keys(redis_keys) <= LASTING

    run(test)


def test_shared_a_slot_freed_on_one_replica_goes_to_a_waiter_on_another_at_once(redis_keys):
    async def test() -> None:
        async with replicas(redis_keys, 2, one_host(1)) as (first, second):
            latencies = []
            holder, holding = first, await first.acquire(Ask("a", "m"))
            for round_ in range(6):
                waiter = second if holder is first else first
                task = await queued(waiter, Ask("b", "m"))
                assert not task.done()
                released = time.monotonic()
                holder.release(holding)
                holding = await task
                latencies.append(time.monotonic() - released)
                assert isinstance(holding, SharedGrant) and holding.running == 1, round_
                holder = waiter
            holder.release(holding)
        assert max(latencies) < 0.1, latencies

    run(test)


async def _dispatch_order(
    holder: SharedScheduler, asks: list[tuple[SharedScheduler, Ask]], cost: Callable[[Ask], float]
) -> list[str]:
    """Fills the one slot, queues `asks` in order (each through its replica), then finishes each granted
    request with its cost and returns whose request was granted, in order."""
    current: Grant = await holder.acquire(Ask("someone", "m", BATCH))
    owner = holder
    tasks = {await queued(scheduler, ask): scheduler for scheduler, ask in asks}
    order = []
    used = 1.0
    for _ in asks:
        owner.release(current, slot_seconds=used)
        done, _ = await asyncio.wait(tasks, timeout=2, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        task = done.pop()
        owner = tasks.pop(task)
        current = task.result()
        await asyncio.sleep(0.01)
        assert not any(task.done() for task in tasks)  # one slot: one request granted per release
        used = cost(current.ask)
        order.append(current.ask.user)
    owner.release(current)
    return order


def test_shared_noisy_neighbour_on_one_replica_does_not_hold_up_a_chat_on_another(redis_keys):
    async def test() -> None:
        async with replicas(redis_keys, 2, one_host(1)) as (first, second):
            asks = [(first, Ask("a", "m", BATCH))] * 8 + [(second, Ask("b", "m"))] * 3
            order = await _dispatch_order(first, asks, cost=lambda ask: 1.0)
        # b's chats go first, each as soon as the running request ends, though a's whole job came before.
        assert order == ["b"] * 3 + ["a"] * 8

    run(test)


def test_shared_two_batch_users_on_two_replicas_take_turns_in_slot_time(redis_keys):
    async def test() -> None:
        async with replicas(redis_keys, 2, one_host(1)) as (first, second):
            asks = [(first, Ask("a", "m", BATCH))] * 8 + [(second, Ask("b", "m", BATCH))] * 8
            # a's requests take 3 slot-seconds each, b's 1: b runs about three times as many.
            order = await _dispatch_order(first, asks, cost=lambda ask: 3.0 if ask.user == "a" else 1.0)
        first_ten = order[:10]
        assert first_ten.count("b") >= 2 * first_ten.count("a") >= 2, order

    run(test)


def test_shared_a_persons_waiting_cap_holds_across_replicas(redis_keys):
    async def test() -> None:
        limits = Limits(user_waiting=2)
        async with replicas(redis_keys, 2, one_host(1), limits) as (first, second):
            running = await first.acquire(Ask("x", "m"))
            waiting = [await queued(first, Ask("a", "m")), await queued(first, Ask("a", "m"))]
            with pytest.raises(Refused) as refused:
                await second.acquire(Ask("a", "m"))
            assert (refused.value.status, refused.value.message) == (
                429,
                "you already have 2 requests waiting",
            )
            assert refused.value.retry_after >= 1
            other = await queued(second, Ask("b", "m"))  # someone else still may wait
            assert not other.done()
            for task in [*waiting, other]:
                task.cancel()
            await asyncio.gather(*waiting, other, return_exceptions=True)
            first.release(running)
            await settle(first, second)
        assert await our_keys(redis_keys) <= LASTING

    run(test)


def test_shared_a_persons_inflight_cap_holds_across_replicas_while_others_go(redis_keys):
    async def test() -> None:
        async with replicas(redis_keys, 2, one_host(4), Limits(user_inflight=1)) as (first, second):
            mine = await first.acquire(Ask("a", "m"))
            second_of_mine = await queued(second, Ask("a", "m"))
            others = await second.acquire(Ask("b", "m"))
            await asyncio.sleep(0.05)
            assert not second_of_mine.done()
            first.release(mine)
            granted = await asyncio.wait_for(second_of_mine, 1)
            second.release(granted)
            second.release(others)

    run(test)


def test_shared_cancellations_and_timeouts_leave_nothing_behind(redis_keys):
    async def test() -> None:
        rng = random.Random(7)
        limits = Limits(interactive_timeout=0.1, batch_timeout=0.1)
        async with replicas(redis_keys, 2, one_host(3), limits) as group:
            tasks = [
                start(group[n % 2], Ask(f"u{n % 4}", "m", rng.choice(list(Band)), key=f"k{n % 3}"))
                for n in range(120)
            ]
            for _ in range(30):
                await asyncio.sleep(0.003)
                for task in rng.sample(tasks, 5):
                    task.cancel()
                for task in list(tasks):
                    if task.done() and not task.cancelled() and task.exception() is None:
                        group[0].release(task.result())  # any replica can give a grant back
                        tasks.remove(task)
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, Grant):
                    group[1].release(result)
            assert {type(result) for result in results} <= {Refused, asyncio.CancelledError, SharedGrant}
            await settle(*group)
            for scheduler in group:
                assert scheduler.waiting() == {"interactive": 0, "batch": 0}
            left = await our_keys(redis_keys)
            assert left <= LASTING | {"replicas"}, left
        assert await our_keys(redis_keys) <= LASTING

    run(test)


def test_shared_a_request_that_waits_too_long_is_refused_with_503(redis_keys):
    async def test() -> None:
        async with replicas(redis_keys, 2, one_host(1), Limits(interactive_timeout=0.1)) as (first, second):
            running = await first.acquire(Ask("a", "m"))
            with pytest.raises(Refused) as refused:
                await second.acquire(Ask("b", "m"))
            assert refused.value.status == 503 and refused.value.retry_after >= 1
            first.release(running)
            await settle(first, second)
            assert await our_keys(redis_keys) <= LASTING | {"replicas"}

    run(test)


def test_shared_a_grant_whose_message_is_lost_is_learned_at_the_next_renewal(redis_keys):
    async def test() -> None:
        async with replicas(redis_keys, 2, one_host(1)) as (first, second):
            running = await first.acquire(Ask("a", "m"))
            waiting = await queued(second, Ask("b", "m"))
            # The second replica stops listening: the grant's message goes to nobody.
            assert second._listener is not None
            second._listener.cancel()
            released = time.monotonic()
            first.release(running)
            grant = await asyncio.wait_for(waiting, LEASE)
            assert time.monotonic() - released <= LEASE / 3 + SLACK
            second.release(grant)

    run(test)


def test_shared_a_grant_for_a_request_gone_in_that_instant_is_given_back(redis_keys):
    async def test() -> None:
        async with replicas(redis_keys, 2, one_host(1)) as (first, second):
            for _ in range(10):
                running = await first.acquire(Ask("a", "m"))
                waiting = await queued(second, Ask("b", "m"))
                first.release(running)
                await asyncio.sleep(random.uniform(0.0, 0.004))  # its grant on the way, or not
                waiting.cancel()
                result = (await asyncio.gather(waiting, return_exceptions=True))[0]
                if isinstance(result, Grant):
                    second.release(result)
                await settle(first, second)
                assert await live_slots(first._link, redis_keys.prefix, "h1", "m") == 0
            assert await our_keys(redis_keys) <= LASTING | {"replicas"}

    run(test)


def test_shared_a_request_waiting_when_redis_loses_its_data_queues_again_and_is_served(redis_keys, caplog):
    caplog.set_level(logging.WARNING, logger="gateway.scheduler")

    async def test() -> None:
        async with replicas(redis_keys, 2, one_host(1)) as (first, second):
            running = await first.acquire(Ask("a", "m"))
            waiting = await queued(second, Ask("b", "m"))
            client = first._link.client
            await client.delete(*[key async for key in client.scan_iter(match=f"{redis_keys.prefix}*")])
            # As after a restart without persistence: the waiter, unknown to Redis now, joins the queue
            # again at the next renewal; the running request's lease is gone, but it still runs, so its
            # replica counts it in Redis again, and the waiter gets the slot when it ends, not before.
            await asyncio.sleep(LEASE)
            assert not waiting.done()
            assert await live_slots(first._link, redis_keys.prefix, "h1", "m") == 1
            first.release(running)
            grant = await asyncio.wait_for(waiting, LEASE)
            assert isinstance(grant, SharedGrant)
            second.release(grant)
            await settle(first, second)
        lost = [record for record in caplog.records if "expired in Redis" in record.getMessage()]
        assert len(lost) == 1

    run(test)


def _replica_process(mode: str, keys: KeySpace, *arguments: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.shared_replica", mode, keys.url, keys.prefix, *map(str, arguments)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_shared_three_replica_processes_never_run_more_than_the_slots_together(redis_keys):
    slots, tasks, rounds = 3, 6, 12
    processes = [_replica_process("contend", redis_keys, slots, tasks, rounds) for _ in range(3)]
    client = redis.Redis.from_url(redis_keys.url, socket_timeout=5)
    try:
        client.set(shared_replica.go_key(redis_keys.prefix), 1)
        outputs = [process.communicate(timeout=PROCESS_TIMEOUT) for process in processes]
        most = int(client.get(shared_replica.most_key(redis_keys.prefix)) or 0)
    finally:
        for process in processes:
            process.kill()
            process.communicate(timeout=PROCESS_TIMEOUT)
        client.close()
    for process, (_out, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err
    tallies = [json.loads(out) for out, _ in outputs]
    assert all(tally["granted"] == tasks * rounds for tally in tallies), tallies
    assert sum(tally["waited"] for tally in tallies) > 0, "they never contended"
    assert most == slots, f"{most} running at once with {slots} slots"


def test_shared_a_replica_killed_with_sigkill_gives_its_slots_back_and_its_waiter_blocks_nobody(redis_keys):
    slots = 2
    process = _replica_process("hold", redis_keys, slots, LEASE)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "held", process.stderr.read() if process.stderr else ""
        time.sleep(LEASE * 1.5)  # past the first expiry: its renewals keep everything
        os.kill(process.pid, signal.SIGKILL)
        killed = time.monotonic()
        process.wait(timeout=PROCESS_TIMEOUT)

        async def test() -> list[float]:
            async with replicas(redis_keys, 1, one_host(slots)) as (survivor,):
                # The dead replica's waiter (user "stranded") is ahead in the queue; ours still get the slots.
                tasks = [await queued(survivor, Ask(f"live{n}", "llama3.2:1b")) for n in range(slots)]
                grants = [await asyncio.wait_for(task, LEASE + SLACK + 1) for task in tasks]
                freed = [time.monotonic() - killed]
                for grant in grants:
                    survivor.release(grant)
                await settle(survivor)
            return freed

        freed = asyncio.run(asyncio.wait_for(test(), 15))
    finally:
        process.kill()
        process.communicate(timeout=PROCESS_TIMEOUT)
    assert freed[0] <= LEASE + SLACK, freed
    assert asyncio.run(our_keys(redis_keys)) <= LASTING


def test_shared_without_redis_each_replica_admits_with_its_share_then_goes_back_to_the_shared_queue(
    redis_keys, caplog
):
    caplog.set_level(logging.WARNING, logger="gateway.scheduler")
    server = ThrowawayRedis()
    metric = "gateway_degraded_admissions_total"

    async def test() -> None:
        before = REGISTRY.get_sample_value(metric) or 0.0
        async with replicas(redis_keys, 2, one_host(4), url=server.url) as (first, second):
            shared = [await first.acquire(Ask("a", "m")) for _ in range(4)]
            waiting = await queued(second, Ask("b", "m", BATCH))
            assert not waiting.done()
            server.stop()
            # With 2 replicas seen, each has 2 of the host's 4 slots. The second replica's waiter moves to
            # its local queue and is admitted there; one more request fits, the next waits.
            moved = await asyncio.wait_for(waiting, 2)
            assert not isinstance(moved, SharedGrant) and second.degraded
            also = await asyncio.wait_for(second.acquire(Ask("b", "m")), 1)
            third = start(second, Ask("b", "m"))
            # The first replica still runs 4 shared grants: no local slot until they end (2 of its share).
            local = start(first, Ask("c", "m"))
            await asyncio.sleep(0.1)
            assert not third.done() and not local.done() and first.degraded
            first.release(shared[0])
            first.release(shared[1])
            first.release(shared[2])
            one = await asyncio.wait_for(local, 1)
            assert first.inflight("h1", "m") == 2  # one shared, one local
            assert REGISTRY.get_sample_value(metric) == before + 3
            # Redis back on the same port (empty): new requests use the shared queue again, no restart. What
            # still runs is counted there again (the shared grant whose lease was lost, the local grants),
            # so the shared queue sees the host full; the request waiting locally joins it.
            restarted = ThrowawayRedis(port=server.port)
            try:
                for _ in range(100):
                    if first._link.up and second._link.up:
                        break
                    await asyncio.sleep(0.05)
                # Each replica counts its local grants in Redis at its next call or renewal (within a third
                # of LEASE_SECONDS): until then the other may hand out their slots (README), so wait for it.
                for _ in range(100):
                    if (
                        await live_slots(first._link, redis_keys.prefix, "h1", "m") == 4
                        and second.waiting("m")["interactive"] == 1
                    ):
                        break
                    await asyncio.sleep(0.02)
                assert await live_slots(first._link, redis_keys.prefix, "h1", "m") == 4
                assert second.waiting("m")["interactive"] == 1  # `third`, in the shared queue now
                back = start(first, Ask("d", "m"))
                await asyncio.sleep(0.1)
                assert await live_slots(first._link, redis_keys.prefix, "h1", "m") == 4
                assert not back.done() and not third.done() and not first.degraded
                said = [record for record in caplog.records if "out of reach" in record.getMessage()]
                assert len(said) == 2, said  # once per replica, however many requests it admitted
                third.cancel()
                await asyncio.gather(third, return_exceptions=True)
                second.release(moved)
                back_grant = await asyncio.wait_for(back, 2)
                assert isinstance(back_grant, SharedGrant)
                second.release(also)
                for grant in (shared[3], one, back_grant):
                    first.release(grant)
                await settle(first, second)
                assert first.inflight_by_slot() == {} and second.inflight_by_slot() == {}
                assert await our_keys(redis_keys, restarted.url) <= LASTING | {"replicas"}
            finally:
                restarted.stop()
        assert REGISTRY.get_sample_value(metric) == before + 3

    try:
        run(test, timeout=20)
    finally:
        server.stop()


def test_fleet_uses_the_shared_queue_only_with_redis(redis_keys):
    async def test() -> None:
        link = RedisLink(redis_keys.url)
        hosts = Hosts(UpstreamTimeouts(connect=1, first_byte=1, idle=1))
        shared = Fleet(hosts, Limits(), 60, shared=SharedQueue(link, redis_keys.prefix, LEASE))
        alone = Fleet(Hosts(UpstreamTimeouts(connect=1, first_byte=1, idle=1)), Limits(), 60)
        assert isinstance(shared.scheduler, SharedScheduler)
        assert type(alone.scheduler) is Scheduler
        await shared.close()
        await alone.close()
        await link.aclose()

    run(test)


def test_shared_two_gateways_on_one_redis_never_send_a_host_more_than_its_slots(
    make_gateway, make_fake, redis_keys
):
    host = make_fake(num_parallel=1)
    shared = {"redis_url": redis_keys.url, "redis_prefix": redis_keys.prefix, "lease_seconds": LEASE}
    gateways = [make_gateway(ollama_url=host.url, ollama_parallel=1, **shared) for _ in range(2)]
    assert all(isinstance(gateway.services.fleet.scheduler, SharedScheduler) for gateway in gateways)
    body = {**chat_body(tokens=3, interval=0.02), "stream": False}
    headers = [gateway.admin_headers() for gateway in gateways]

    def chat(number: int) -> int:
        gateway = gateways[number % 2]
        answer = httpx.post(f"{gateway.url}/api/chat", json=body, headers=headers[number % 2], timeout=30)
        return answer.status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(chat, range(8)))
    assert statuses == [200] * 8
    # Each gateway alone would have sent one at a time, two together: the shared slot kept it to one.
    assert host.model_stats(shared_replica.MODEL).max_in_flight == 1
