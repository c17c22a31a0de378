"""Quota ledgers in Redis (REDIS_URL): one count per person or API key and period for every replica, so that
N gateways together enforce one quota with the same bounded overshoot as one process (issue 14).

A ledger is a Redis hash, one per (subject kind, id, period's start): what was used (`requests`, `tokens`,
`slot_seconds`), the moment its count in Redis starts (`cut`), whether the database's part is in it
(`seeded`), and one field per request in flight holding an estimate (`hold:<holder>`). Why each choice:

- **One script to hold.** Checking every subject's limits (used plus the live holds) and adding the
  request's hold to each is one Lua script over all the request's ledgers, run alone by Redis: two
  replicas can't both see the last request of a limit free and both take it. A request limit, whose
  estimate is exact, is never overrun; tokens and slot-seconds by at most what was in flight beyond its
  estimates, as in one process.
- **Holds expire unless renewed**, like the shared queue's slots (`fleet.shared_scheduler`): each carries
  its expiry on Redis's clock, its replica renews them every third of LEASE_SECONDS while the request
  runs, and the hold script drops the expired ones. A replica killed with `kill -9` leaves no estimate held
  for longer than that.
- **Seeded once, at a cut.** The first replica to need a ledger creates it with `cut` = Redis's time; from
  then on every request that ends with a record time at or after the cut is added in Redis (`END`), and the
  ledger's earlier use is read from the usage records with a time before the cut (`usage.store.spent`,
  `until`), added by `SEED` only if no one has (`HSETNX seeded`). Replicas that read at once read the same
  cut: one adds its sum, the others' are dropped; a replica that dies between the two leaves the seed to
  the next reader. Each record counts once, in Redis or in the read, never in both, and none ending after
  the cut is missed while the read runs (reading first and seeding after would miss or double count those).
  What the read can miss: records ended before the cut that another replica had not written yet (its writer
  writes every half second), and a few milliseconds of records either side of the cut when a replica's
  clock is off Redis's (keep them on NTP). Both are small and only at a ledger's start.
- **What ended counts in every ledger of its person and key that exists** (their day's and month's), held or
  not, so a quota changed to another period, or set on the key later, sees it. Requests of people and keys
  with no quota never reach Redis (one process's speed, and nothing to count for them): a ledger of a
  subject whose quota is cleared is therefore removed (`forget`), and the next quota reads the records again.
- Each ledger expires `KEPT_AFTER` after its period ends: a request that runs across midnight still settles
  its hold; nothing is left behind.

A call that fails raises `RedisUnavailable` (the link logged it); `usage.quotas` then refuses or counts
locally, by QUOTAS_WITHOUT_REDIS. What ended while Redis did not answer is added when it answers again
(`_replay`), so the shared count does not lose a degraded spell's use.
"""

import asyncio
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass
from datetime import datetime
from itertools import count
from typing import Any

from cluster.redis_link import RedisLink, RedisUnavailable
from usage.periods import Span
from usage.store import Spent

logger = logging.getLogger("gateway.usage")

KEPT_AFTER = 3600  # seconds a ledger is kept after its period ends
MAX_UNSENT = 10_000  # ends kept while Redis does not answer, to add when it does
REPLAY_CHECK = 1.0
# A ledger that vanishes between its seed and the hold (Redis flushed, or restarted) is seeded again, a
# few times at most: then Redis is treated as not answering.
SEED_ATTEMPTS = 3

_NOW = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
"""

# KEYS: the request's ledgers. ARGV: holder, hold in ms, estimate (tokens, slot-seconds, requests), then
# for each ledger: its limits (requests, tokens, slot-seconds; -1 for none) and its expiry (ms since
# the epoch). Answers {'held'}, {'refused', ledger index, limit index (1 requests, 2 tokens, 3
# slot-seconds)}, or {'seed', index, cut, index, cut, ...} for ledgers not seeded yet (nothing held then).
HOLD = (
    _NOW
    + """
local holder, lease = ARGV[1], tonumber(ARGV[2])
local unseeded = {}
for i, key in ipairs(KEYS) do
  if redis.call('HEXISTS', key, 'seeded') == 0 then
    local cut = redis.call('HGET', key, 'cut')
    if not cut then
      cut = string.format('%d', now)
      redis.call('HSET', key, 'cut', cut)
      redis.call('PEXPIREAT', key, ARGV[5 + (i - 1) * 4 + 4])
    end
    table.insert(unseeded, i)
    table.insert(unseeded, cut)
  end
end
if #unseeded > 0 then
  table.insert(unseeded, 1, 'seed')
  return unseeded
end
for i, key in ipairs(KEYS) do
  local base = 5 + (i - 1) * 4
  local fields = redis.call('HGETALL', key)
  local held = {0, 0, 0}
  local used = {0, 0, 0}
  for j = 1, #fields, 2 do
    local name, value = fields[j], fields[j + 1]
    if string.sub(name, 1, 5) == 'hold:' then
      local expiry, tokens, seconds, requests = string.match(value, '^(%S+) (%S+) (%S+) (%S+)$')
      if tonumber(expiry) <= now then
        redis.call('HDEL', key, name)
      else
        held[1] = held[1] + tonumber(requests)
        held[2] = held[2] + tonumber(tokens)
        held[3] = held[3] + tonumber(seconds)
      end
    elseif name == 'requests' then used[1] = tonumber(value)
    elseif name == 'tokens' then used[2] = tonumber(value)
    elseif name == 'slot_seconds' then used[3] = tonumber(value)
    end
  end
  for limit = 1, 3 do
    local most = tonumber(ARGV[base + limit])
    if most >= 0 and used[limit] + held[limit] >= most then
      return {'refused', i, limit}
    end
  end
end
local hold = string.format('%d', now + lease) .. ' ' .. ARGV[3] .. ' ' .. ARGV[4] .. ' ' .. ARGV[5]
for _, key in ipairs(KEYS) do
  redis.call('HSET', key, 'hold:' .. holder, hold)
end
return {'held'}
"""
)

# KEYS[1]: a ledger. ARGV: the cut its use was read up to, then requests, tokens, slot-seconds. 1 if added,
# 0 if someone had (or the ledger is gone, or another cut's: read again).
SEED = """
local key = KEYS[1]
if redis.call('HGET', key, 'cut') ~= ARGV[1] then return 0 end
if redis.call('HSETNX', key, 'seeded', 1) == 0 then return 0 end
redis.call('HINCRBY', key, 'requests', ARGV[2])
redis.call('HINCRBY', key, 'tokens', ARGV[3])
redis.call('HINCRBYFLOAT', key, 'slot_seconds', ARGV[4])
return 1
"""

# KEYS: ledgers. ARGV: holder ('' if none), the record's time (ms, may be fractional), whether it counts
# (1 if it reached Ollama), its tokens and slot-seconds, then for each ledger 'h' (give its hold back),
# 'c' (count the use there) or 'hc'. Ledgers that are gone are left gone.
END = """
local holder, at, counts = ARGV[1], tonumber(ARGV[2]), ARGV[3] == '1'
for i, key in ipairs(KEYS) do
  local what = ARGV[5 + i]
  local cut = redis.call('HGET', key, 'cut')
  if cut then
    if string.find(what, 'h', 1, true) and holder ~= '' then
      redis.call('HDEL', key, 'hold:' .. holder)
    end
    if counts and string.find(what, 'c', 1, true) and at >= tonumber(cut) then
      redis.call('HINCRBY', key, 'requests', 1)
      redis.call('HINCRBY', key, 'tokens', ARGV[4])
      redis.call('HINCRBYFLOAT', key, 'slot_seconds', ARGV[5])
    end
  end
end
return 1
"""

# KEYS[i]: a ledger holding ARGV[i + 1]'s estimate; ARGV[1]: the hold in ms. Each hold still there gets a
# new expiry; one that expired (or went with Redis's data) is not brought back.
RENEW = (
    _NOW
    + """
local lease = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  local name = 'hold:' .. ARGV[i + 1]
  local value = redis.call('HGET', key, name)
  if value then
    local expiry, rest = string.match(value, '^(%S+) (.*)$')
    if tonumber(expiry) > now then
      redis.call('HSET', key, name, string.format('%d', now + lease) .. ' ' .. rest)
    end
  end
end
return 1
"""
)


class Refused(Exception):
    """A ledger's limit is reached: `index` of the ledger in the request's, `limit` 0 requests, 1 tokens,
    2 slot-seconds."""

    def __init__(self, index: int, limit: int) -> None:
        super().__init__(index, limit)
        self.index = index
        self.limit = limit


@dataclass(frozen=True)
class Ledger:
    """One of a request's ledgers, as `hold` is given it: its key, its limits, its period."""

    key: str
    requests: int | None
    tokens: int | None
    slot_seconds: float | None
    span: Span


class SharedLedgers:
    """This process's side of the ledgers in Redis: holding, seeding, settling, renewing, reading."""

    def __init__(self, link: RedisLink, prefix: str, lease_seconds: float) -> None:
        self.link = link
        self._prefix = prefix
        self.lease_seconds = lease_seconds
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._process = secrets.token_hex(8)
        self._counter = count(1)
        client = link.client
        self._hold = client.register_script(HOLD)
        self._seed = client.register_script(SEED)
        self._end = client.register_script(END)
        self._renew = client.register_script(RENEW)
        self._held: dict[str, list[str]] = {}  # holder: its ledgers' keys
        self._renewer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._unsent: deque[tuple[list[str], list[str]]] = deque(maxlen=MAX_UNSENT)
        self._replayer: asyncio.Task[None] | None = None

    def key(self, kind: str, subject_id: int, span: Span) -> str:
        return f"{self._prefix}quota:{kind}:{subject_id}:{int(span.start.timestamp())}"

    def new_holder(self) -> str:
        return f"{self._process}:{next(self._counter)}"

    async def hold(
        self, ledgers: list[Ledger], estimate: tuple[float, float, int], holder: str
    ) -> list[tuple[int, str]]:
        """Hold `estimate` (tokens, slot-seconds, requests) in every ledger: [] if held, else the
        (index, cut) of the ledgers to seed first (nothing held then). Refused if a limit is reached."""
        args: list[Any] = [holder, self._lease_ms, repr(float(estimate[0])), repr(float(estimate[1]))]
        args.append(estimate[2])
        for ledger in ledgers:
            expiry = int((ledger.span.end.timestamp() + KEPT_AFTER) * 1000)
            args += [_limit(ledger.requests), _limit(ledger.tokens), _limit(ledger.slot_seconds), expiry]
        answer = await self.link.call(self._hold(keys=[ledger.key for ledger in ledgers], args=args))
        verdict = _text(answer[0])
        if verdict == "held":
            self._held[holder] = [ledger.key for ledger in ledgers]
            self._start_renewer()
            return []
        if verdict == "refused":
            raise Refused(int(answer[1]) - 1, int(answer[2]) - 1)
        return [(int(answer[i]) - 1, _text(answer[i + 1])) for i in range(1, len(answer), 2)]

    async def seed(self, key: str, cut: str, spent: Spent) -> bool:
        """Add the use read from the records before `cut` to the ledger, unless another replica has."""
        args = [cut, str(spent.requests), str(spent.tokens), repr(float(spent.slot_seconds))]
        return bool(await self.link.call(self._seed(keys=[key], args=args)))

    def ended(
        self, holder: str | None, held: list[str], counted: list[str], at: datetime, used: Spent | None
    ) -> None:
        """A request ended: give its hold back from `held`, and add what it `used` (None: it never reached
        Ollama) to `counted`, in the background; kept to add later if Redis does not answer."""
        if holder is not None:
            self._held.pop(holder, None)
        what: dict[str, str] = dict.fromkeys(held, "h")
        if used is not None:
            for key in counted:
                what[key] = what.get(key, "") + "c"
        if not what:
            return
        used = used or Spent()
        args = [holder or "", repr(at.timestamp() * 1000), "1" if used.requests else "0", used.tokens]
        args += [repr(float(used.slot_seconds)), *what.values()]
        self._background(self._send_end(list(what), [str(arg) for arg in args]))

    async def _send_end(self, keys: list[str], args: list[str]) -> None:
        try:
            await self.link.call(self._end(keys=keys, args=args))
        except RedisUnavailable:
            if len(self._unsent) == self._unsent.maxlen:
                logger.warning("Redis has not answered for long: the oldest quota counts kept are dropped")
            self._unsent.append((keys, args))
            if self._replayer is None or self._replayer.done():
                self._replayer = asyncio.create_task(self._replay(), name="quota-replay")

    async def _replay(self) -> None:
        """Once Redis answers again, add what ended meanwhile, oldest first. A hold given back late is
        harmless (it expired); a count sent twice (a reply lost after Redis ran it) counts twice: the
        error is on the side of refusing early."""
        while self._unsent:
            await asyncio.sleep(REPLAY_CHECK)
            while self._unsent and self.link.up:
                keys, args = self._unsent[0]
                try:
                    await self.link.call(self._end(keys=keys, args=args))
                except RedisUnavailable:
                    break
                self._unsent.popleft()

    async def used(self, key: str) -> Spent | None:
        """What the ledger counts as used, if it is seeded (None: not there)."""
        seeded, requests, tokens, seconds = await self.link.call(
            self.link.client.hmget(key, ["seeded", "requests", "tokens", "slot_seconds"])
        )
        if seeded is None:
            return None
        return Spent(int(requests or 0), int(tokens or 0), float(seconds or 0.0))

    async def forget(self, keys: list[str]) -> None:
        await self.link.call(self.link.client.delete(*keys))

    async def renew(self) -> None:
        pairs = [(key, holder) for holder, keys in list(self._held.items()) for key in keys]
        if pairs:
            keys = [key for key, _ in pairs]
            await self.link.call(self._renew(keys=keys, args=[self._lease_ms, *[h for _, h in pairs]]))

    async def settled(self) -> None:
        """Wait for the ends sent in the background (the tests' and shutdown's)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_while_held(), name="quota-hold-renewer")

    async def _renew_while_held(self) -> None:
        while self._held:
            await asyncio.sleep(self.lease_seconds / 3)
            with contextlib.suppress(RedisUnavailable):  # the link said so; the next round tries again
                await self.renew()

    async def aclose(self) -> None:
        """Send what ended, then stop (what is held and not given back expires)."""
        await self.settled()
        for task in (self._renewer, self._replayer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._renewer = self._replayer = None


def _limit(value: float | None) -> str:
    return "-1" if value is None else repr(value)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
