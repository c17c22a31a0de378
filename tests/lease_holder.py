"""A separate process taking slot leases, as another gateway replica would: `python -m tests.lease_holder`.

- `contend URL PREFIX LIMIT TASKS ROUNDS`: waits for the test's go (a key in Redis), then TASKS tasks each
  try ROUNDS times to take one of LIMIT slots, hold it a few milliseconds and give it back. While holding,
  each adds itself to a counter in Redis and keeps the highest it saw: the most holders at once, across
  every process, measured apart from the leases. Prints `{"acquired": n, "refused": m}` at the end.
- `hold URL PREFIX LIMIT LEASE_SECONDS`: takes all LIMIT slots, prints `held`, and keeps them (renewed)
  until killed, or for HOLD_AT_MOST seconds.
"""

import asyncio
import json
import random
import sys

from cluster.leases import SlotLeases
from cluster.redis_link import RedisLink

HOST = "gpu-1:11434"
MODEL = "llama3.2:1b"
GO_WAIT = 20.0
HOLD_AT_MOST = 60.0
# Adds one holder to the counter, and raises the highest seen to it if higher: one step, so two processes
# can't both read the old highest.
ENTER = """
local now = redis.call('INCR', KEYS[1])
if now > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], now) end
return now
"""


def go_key(prefix: str) -> str:
    return f"{prefix}go"


def holding_key(prefix: str) -> str:
    return f"{prefix}holding"


def most_key(prefix: str) -> str:
    return f"{prefix}most-at-once"


async def contend(url: str, prefix: str, limit: int, tasks: int, rounds: int) -> None:
    link = RedisLink(url, command_timeout=5)
    leases = SlotLeases(link, prefix, lease_seconds=10)
    client = link.client
    enter = client.register_script(ENTER)
    tally = {"acquired": 0, "refused": 0}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + GO_WAIT
    while not await client.exists(go_key(prefix)):
        if loop.time() > deadline:
            raise SystemExit("no go from the test")
        await asyncio.sleep(0.01)

    async def one_task() -> None:
        for _ in range(rounds):
            holder = leases.new_holder()
            if not await leases.acquire(HOST, MODEL, limit, holder):
                tally["refused"] += 1
                await asyncio.sleep(random.uniform(0.001, 0.004))
                continue
            tally["acquired"] += 1
            await enter(keys=[holding_key(prefix), most_key(prefix)])
            await asyncio.sleep(random.uniform(0.005, 0.015))
            await client.decr(holding_key(prefix))
            await leases.release(HOST, MODEL, holder)

    await asyncio.gather(*(one_task() for _ in range(tasks)))
    await leases.aclose()
    await link.aclose()
    print(json.dumps(tally), flush=True)


async def hold(url: str, prefix: str, limit: int, lease_seconds: float) -> None:
    link = RedisLink(url)
    leases = SlotLeases(link, prefix, lease_seconds)
    for _ in range(limit):
        if not await leases.acquire(HOST, MODEL, limit, leases.new_holder()):
            raise SystemExit("a slot was taken")
    print("held", flush=True)
    await asyncio.sleep(HOLD_AT_MOST)


def main(arguments: list[str]) -> None:
    mode, url, prefix, *rest = arguments
    if mode == "contend":
        limit, tasks, rounds = (int(value) for value in rest)
        asyncio.run(contend(url, prefix, limit, tasks, rounds))
    elif mode == "hold":
        asyncio.run(hold(url, prefix, int(rest[0]), float(rest[1])))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
