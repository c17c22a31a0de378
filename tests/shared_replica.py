"""A separate process with a shared scheduler, as another gateway replica would have:
`python -m tests.shared_replica`.

- `contend URL PREFIX SLOTS TASKS ROUNDS`: waits for the test's go (a key in Redis), then TASKS tasks each
  ask ROUNDS times for a slot on the one host (SLOTS slots), hold it a few milliseconds and give it back.
  While holding, each adds itself to a counter in Redis and keeps the highest it saw: the most requests
  running at once, across every process, measured apart from the scheduler. Prints
  `{"granted": n, "waited": m}` at the end (m: grants that had to wait for a slot).
- `hold URL PREFIX SLOTS LEASE_SECONDS`: takes all SLOTS slots, then queues one more request (user
  `stranded`), prints `held` once it waits, and keeps everything (renewed) until killed, or for
  HOLD_AT_MOST seconds.
"""

import asyncio
import json
import random
import sys

from cluster.redis_link import RedisLink
from fleet.scheduler import Ask, Candidate
from fleet.shared_scheduler import SharedScheduler

HOST = "gpu-1"
MODEL = "llama3.2:1b"
GO_WAIT = 20.0
HOLD_AT_MOST = 60.0
# Adds one holder to the counter, and raises the highest seen to it if higher: one step.
ENTER = """
local now = redis.call('INCR', KEYS[1])
if now > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], now) end
return now
"""


def go_key(prefix: str) -> str:
    return f"{prefix}test:go"


def holding_key(prefix: str) -> str:
    return f"{prefix}test:holding"


def most_key(prefix: str) -> str:
    return f"{prefix}test:most-at-once"


def one_host(slots: int) -> list[Candidate]:
    return [Candidate(HOST, loaded=True, slots=slots)]


async def contend(url: str, prefix: str, slots: int, tasks: int, rounds: int) -> None:
    link = RedisLink(url, command_timeout=5)
    await link.start()
    scheduler = SharedScheduler(lambda model: one_host(slots), link, prefix, lease_seconds=10)
    scheduler.start()
    client = link.client
    enter = client.register_script(ENTER)
    tally = {"granted": 0, "waited": 0}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GO_WAIT
    while not await client.exists(go_key(prefix)):
        if loop.time() > deadline:
            raise SystemExit("no go from the test")
        await asyncio.sleep(0.01)

    async def one_task(number: int) -> None:
        for _ in range(rounds):
            grant = await scheduler.acquire(Ask(f"user-{number % 3}", MODEL))
            tally["granted"] += 1
            tally["waited"] += grant.waited > 0.002
            await enter(keys=[holding_key(prefix), most_key(prefix)])
            await asyncio.sleep(random.uniform(0.002, 0.008))
            await client.decr(holding_key(prefix))
            scheduler.release(grant)

    await asyncio.gather(*(one_task(number) for number in range(tasks)))
    await scheduler.aclose()
    await link.aclose()
    print(json.dumps(tally), flush=True)


async def hold(url: str, prefix: str, slots: int, lease_seconds: float) -> None:
    link = RedisLink(url)
    await link.start()
    scheduler = SharedScheduler(lambda model: one_host(slots), link, prefix, lease_seconds)
    scheduler.start()
    for _ in range(slots):
        await scheduler.acquire(Ask("holder", MODEL))
    stranded = asyncio.create_task(scheduler.acquire(Ask("stranded", MODEL)))
    for _ in range(200):  # until its enqueue answered (bounded: 2 s)
        await asyncio.sleep(0.01)
        if scheduler.waiting(MODEL)["interactive"]:
            break
    await asyncio.sleep(0.05)
    print("held", flush=True)
    await asyncio.sleep(HOLD_AT_MOST)
    stranded.cancel()


def main(arguments: list[str]) -> None:
    mode, url, prefix, *rest = arguments
    if mode == "contend":
        slots, tasks, rounds = (int(value) for value in rest)
        asyncio.run(contend(url, prefix, slots, tasks, rounds))
    elif mode == "hold":
        asyncio.run(hold(url, prefix, int(rest[0]), float(rest[1])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
