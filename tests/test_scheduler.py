"""The admission point's ordering and counting (fleet.scheduler), on its own: slots, bands, fair shares of
slot-time, caps, timeouts, cancellation. The gateway's tests with real hosts are in test_fleet*.py."""

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from fleet.scheduler import Ask, Band, Candidate, Grant, Limits, Refused, Scheduler

BATCH = Band.BATCH


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), timeout=10))


def hosts(*candidates: Candidate) -> Callable[[str], list[Candidate]]:
    return lambda model: list(candidates)


def one_host(slots: int | None) -> Callable[[str], list[Candidate]]:
    return hosts(Candidate("h1", loaded=True, slots=slots))


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def start(scheduler: Scheduler, ask: Ask) -> asyncio.Task[Grant]:
    return asyncio.get_running_loop().create_task(scheduler.acquire(ask))


def test_scheduler_never_grants_more_than_the_slots_and_hands_a_freed_slot_on_at_once():
    async def test():
        scheduler = Scheduler(one_host(2))
        tasks = [start(scheduler, Ask("u", "m")) for _ in range(5)]
        await settle()
        granted = [task for task in tasks if task.done()]
        assert len(granted) == 2
        assert scheduler.inflight("h1", "m") == 2
        assert scheduler.waiting("m") == {"interactive": 3, "batch": 0}
        scheduler.release(granted[0].result())
        await settle()
        assert sum(task.done() for task in tasks) == 3
        assert scheduler.inflight("h1", "m") == 2
        for task in tasks:
            if task.done():
                scheduler.release(task.result())
        await settle()
        for task in tasks:
            scheduler.release(await task)
        assert scheduler.inflight_by_slot() == {}

    run(test)


def test_scheduler_without_known_slots_lets_everything_through():
    async def test():
        scheduler = Scheduler(one_host(None))
        grants = [await scheduler.acquire(Ask("u", "m")) for _ in range(20)]
        assert scheduler.inflight("h1", "m") == 20
        for grant in grants:
            scheduler.release(grant)
        assert scheduler.inflight_by_slot() == {}

    run(test)


def test_scheduler_serves_interactive_before_batch_whoever_came_first():
    async def test():
        scheduler = Scheduler(one_host(1))
        running = await scheduler.acquire(Ask("a", "m"))
        batch = start(scheduler, Ask("b", "m", BATCH))
        await settle()
        interactive = start(scheduler, Ask("c", "m"))
        await settle()
        scheduler.release(running)
        await settle()
        assert interactive.done() and not batch.done()
        scheduler.release(interactive.result())
        scheduler.release(await batch)

    run(test)


async def _dispatch_order(scheduler: Scheduler, asks: list[Ask], cost: Callable[[Ask], float]) -> list[str]:
    """Fills the one slot, queues `asks` in order, then finishes each granted request with its cost and
    returns whose request was granted, in order."""
    blocker = await scheduler.acquire(Ask("someone", "m", BATCH))
    tasks = [start(scheduler, ask) for ask in asks]
    await settle()
    order = []
    current, used = blocker, 1.0
    for _ in asks:
        scheduler.release(current, slot_seconds=used)
        await settle()
        done = [task for task in tasks if task.done()]
        assert len(done) == 1  # one slot: one request granted per release
        tasks.remove(done[0])
        current = done[0].result()
        used = cost(current.ask)
        order.append(current.ask.user)
    scheduler.release(current)
    return order


def test_two_batch_users_take_turns_whoever_queued_first():
    async def test():
        scheduler = Scheduler(one_host(1))
        asks = [Ask("a", "m", BATCH)] * 6 + [Ask("b", "m", BATCH)] * 6
        order = await _dispatch_order(scheduler, asks, cost=lambda ask: 1.0)
        assert order[:8] == ["a", "b"] * 4 or order[:8] == ["b", "a"] * 4

    run(test)


def test_fair_share_is_of_slot_time_not_of_requests():
    async def test():
        scheduler = Scheduler(one_host(1))
        # a's requests take 3 slot-seconds each, b's 1: over the same time, b runs three times as many.
        asks = [Ask("a", "m", BATCH)] * 12 + [Ask("b", "m", BATCH)] * 12
        order = await _dispatch_order(scheduler, asks, cost=lambda ask: 3.0 if ask.user == "a" else 1.0)
        first = order[:12]
        seconds_a = 3.0 * first.count("a")
        seconds_b = 1.0 * first.count("b")
        assert first.count("b") >= 2 * first.count("a")
        assert abs(seconds_a - seconds_b) <= 3.0

    run(test)


def test_one_persons_requests_keep_their_order():
    async def test():
        scheduler = Scheduler(one_host(1))
        blocker = await scheduler.acquire(Ask("x", "m"))
        tasks = [start(scheduler, Ask("a", "m", key=f"k{n}")) for n in range(5)]
        await settle()
        scheduler.release(blocker)
        seen = []
        for _ in tasks:
            await settle()
            done = next(task for task in tasks if task.done() and task.result().ask.key not in seen)
            seen.append(done.result().ask.key)
            scheduler.release(done.result())
        assert seen == [f"k{n}" for n in range(5)]

    run(test)


def test_a_person_back_from_idle_has_not_saved_up_slot_time():
    async def test():
        scheduler = Scheduler(one_host(1))
        # a alone for a long while: a's virtual time runs far ahead.
        for _ in range(50):
            scheduler.release(await scheduler.acquire(Ask("a", "m", BATCH)), slot_seconds=1.0)
        # Now b arrives with as many requests as a: they alternate rather than b going 50 times in a row.
        asks = [Ask("a", "m", BATCH)] * 6 + [Ask("b", "m", BATCH)] * 6
        order = await _dispatch_order(scheduler, asks, cost=lambda ask: 1.0)
        assert order[:6].count("b") <= 4

    run(test)


def test_a_request_cancelled_while_waiting_leaves_the_queue_and_takes_no_slot():
    async def test():
        scheduler = Scheduler(one_host(1))
        running = await scheduler.acquire(Ask("a", "m"))
        waiting = start(scheduler, Ask("b", "m"))
        await settle()
        waiting.cancel()
        await settle()
        assert scheduler.waiting("m") == {"interactive": 0, "batch": 0}
        scheduler.release(running)
        assert scheduler.inflight_by_slot() == {}

    run(test)


def test_a_storm_of_cancelled_and_timed_out_requests_leaves_nothing_counted():
    async def test():
        rng = random.Random(7)
        scheduler = Scheduler(one_host(3), Limits(interactive_timeout=0.05, batch_timeout=0.05))
        tasks = [start(scheduler, Ask(f"u{n % 4}", "m", rng.choice(list(Band)))) for n in range(200)]
        for _ in range(40):
            await asyncio.sleep(0.001)
            for task in rng.sample(tasks, 10):
                task.cancel()
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is None:
                    scheduler.release(task.result())
                    tasks.remove(task)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Grant):
                scheduler.release(result)
        assert scheduler.inflight_by_slot() == {}
        assert scheduler.waiting() == {"interactive": 0, "batch": 0}

    run(test)


def test_a_request_that_waits_too_long_is_refused_with_503():
    async def test():
        scheduler = Scheduler(one_host(1), Limits(interactive_timeout=0.05))
        running = await scheduler.acquire(Ask("a", "m"))
        with pytest.raises(Refused) as refused:
            await scheduler.acquire(Ask("b", "m"))
        assert refused.value.status == 503
        assert refused.value.retry_after >= 1
        assert scheduler.waiting() == {"interactive": 0, "batch": 0}
        scheduler.release(running)

    run(test)


def test_past_the_waiting_cap_a_request_is_refused_with_429():
    async def test():
        scheduler = Scheduler(one_host(1), Limits(user_waiting=2, key_waiting=1))
        running = await scheduler.acquire(Ask("a", "m"))
        waiting = [start(scheduler, Ask("a", "m")) for _ in range(2)]
        await settle()
        assert not any(task.done() for task in waiting), "as many as the cap wait"
        with pytest.raises(Refused) as refused:
            await scheduler.acquire(Ask("a", "m"))
        assert (refused.value.status, refused.value.message) == (429, "you already have 2 requests waiting")
        # Someone else still may wait; a key at its own cap may not.
        others = start(scheduler, Ask("b", "m", key="k"))
        await settle()
        assert not others.done()
        with pytest.raises(Refused):
            await scheduler.acquire(Ask("c", "m", key="k"))
        assert scheduler.waiting()["interactive"] == 3
        for task in [*waiting, others]:
            task.cancel()
        scheduler.release(running)

    run(test)


def test_a_person_at_the_inflight_cap_waits_while_others_go():
    async def test():
        scheduler = Scheduler(one_host(4), Limits(user_inflight=1))
        first = await scheduler.acquire(Ask("a", "m"))
        second = start(scheduler, Ask("a", "m"))
        other = await scheduler.acquire(Ask("b", "m"))
        await settle()
        assert not second.done()
        scheduler.release(first)
        await settle()
        assert second.done()
        scheduler.release(second.result())
        scheduler.release(other)

    run(test)


def test_a_persons_own_waiting_cap_stands_in_for_the_default_and_0_lifts_it():
    async def test():
        scheduler = Scheduler(one_host(1), Limits(user_waiting=1))
        running = await scheduler.acquire(Ask("a", "m"))
        # Ada's own cap is 2: a second request of hers may wait, where the default allows one.
        ada = [start(scheduler, Ask("ada", "m", user_waiting=2)) for _ in range(2)]
        await settle()
        with pytest.raises(Refused) as refused:
            await scheduler.acquire(Ask("ada", "m", user_waiting=2))
        assert (refused.value.status, refused.value.message) == (429, "you already have 2 requests waiting")
        # 0: no cap at all for Bob.
        bob = [start(scheduler, Ask("bob", "m", user_waiting=0)) for _ in range(5)]
        await settle()
        assert not any(task.done() for task in bob)
        assert scheduler.waiting()["interactive"] == 7
        for task in [*ada, *bob]:
            task.cancel()
        await settle()
        scheduler.release(running)
        assert scheduler.inflight_by_slot() == {}

    run(test)


def test_a_persons_own_inflight_cap_stands_in_for_the_default_and_0_lifts_it():
    async def test():
        scheduler = Scheduler(one_host(4), Limits(user_inflight=2))
        capped = [await scheduler.acquire(Ask("a", "m", user_inflight=1))]
        second = start(scheduler, Ask("a", "m", user_inflight=1))
        unlimited = [await scheduler.acquire(Ask("b", "m", user_inflight=0)) for _ in range(3)]
        await settle()
        assert not second.done(), "a's own cap is 1"
        assert len(unlimited) == 3, "b has none, where the default is 2"
        for grant in [*capped, *unlimited]:
            scheduler.release(grant)
        await settle()
        scheduler.release(second.result())

    run(test)


def test_host_choice_prefers_loaded_then_least_loaded_and_avoids_a_failed_host():
    async def test():
        candidates = hosts(
            Candidate("cold", loaded=False, slots=4),
            Candidate("warm1", loaded=True, slots=2),
            Candidate("warm2", loaded=True, slots=2),
        )
        scheduler = Scheduler(candidates, rng=random.Random(1))
        grants = [await scheduler.acquire(Ask("u", "m")) for _ in range(4)]
        assert sorted(grant.host for grant in grants) == ["warm1", "warm1", "warm2", "warm2"]
        fifth = await scheduler.acquire(Ask("u", "m"))
        assert fifth.host == "cold"
        # A retry that avoids the host that failed it waits for a slot elsewhere rather than land there.
        retried = start(scheduler, Ask("u", "m", avoid=frozenset({"cold"})))
        await settle()
        assert not retried.done()
        scheduler.release(grants[0])
        assert (await retried).host == grants[0].host
        for grant in [*grants[1:], fifth, retried.result()]:
            scheduler.release(grant)
        assert scheduler.inflight_by_slot() == {}

    run(test)


def test_closing_refuses_every_waiter():
    async def test():
        scheduler = Scheduler(one_host(1))
        running = await scheduler.acquire(Ask("a", "m"))
        waiting = start(scheduler, Ask("b", "m"))
        await settle()
        scheduler.close()
        with pytest.raises(Refused) as refused:
            await waiting
        assert refused.value.status == 503
        scheduler.release(running)
        assert scheduler.inflight_by_slot() == {}

    run(test)
