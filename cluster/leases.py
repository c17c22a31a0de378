"""Slot leases in Redis: how several gateway replicas together never run more requests on a host's model
than its slots (issue 14).

A (host, model) pair has a limit, its slots. A request running there holds a lease: a member of a sorted
set in Redis, named by a holder id, scored with its expiry (milliseconds on Redis's clock). Why each choice:

- **One script to acquire.** Dropping the expired leases, counting the live ones and adding one if fewer
  than the limit remain is one Lua script, and Redis runs a script alone: two replicas can't both see N-1
  leases and both take the Nth, as they could between separate ZCARD and ZADD calls.
- **Redis's clock.** The scripts read `TIME` themselves; no replica's clock is ever compared with an
  expiry, so replicas whose clocks disagree, or jump, still agree on which leases are alive. Redis 7
  replicates a script's effects, not the script, so reading the time inside it is safe for Redis's own
  replicas too.
- **Expiry, not clean-up on exit.** A replica killed with SIGKILL, frozen or cut off runs no clean-up
  code, so nothing may depend on one: its leases stop being renewed and are free within LEASE_SECONDS. The
  same holds when Redis restarts or loses its data: nothing to reconcile, no lease leaked. While leases are
  held, a renewer renews them all every third of LEASE_SECONDS in one round trip, so a running request
  keeps its slot through a missed renewal or two; `release` frees a slot at once, as a courtesy.
- **Holder ids** are a random id per book (one per process) and a counter: unique across replicas without
  asking anyone, and an acquire retried after its reply was lost finds its own lease rather than taking a
  second one.
- Each set expires with its last lease, so a (host, model) nobody uses any more leaves nothing behind.

Every call goes through the link (`cluster.redis_link`): Redis not answering is `RedisUnavailable` for the
caller to fall back from, and the link's degraded mode.
"""

import asyncio
import logging
import secrets
from contextlib import suppress
from dataclasses import dataclass
from itertools import count
from urllib.parse import quote

from cluster.redis_link import RedisLink, RedisUnavailable

logger = logging.getLogger("gateway.redis")

# Milliseconds on Redis's clock, in every script.
_NOW = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
"""
# The set's own expiry follows its latest lease (whoever set it, with whatever LEASE_SECONDS).
_EXPIRE_WITH_LAST = """
local function expire_with_last(key)
  local last = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if last[2] then redis.call('PEXPIREAT', key, last[2]) end
end
"""

# KEYS[1]: the (host, model)'s leases. ARGV: the limit, the holder, the lease in milliseconds.
# 1 if the holder has a lease now (a new one, or its own renewed), else 0.
ACQUIRE = (
    _NOW
    + _EXPIRE_WITH_LAST
    + """
local key, limit, holder, lease = KEYS[1], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
if not redis.call('ZSCORE', key, holder) and redis.call('ZCARD', key) >= limit then
  return 0
end
redis.call('ZADD', key, now + lease, holder)
expire_with_last(key)
return 1
"""
)

# KEYS[i]: the leases of the (host, model) ARGV[i + 1] holds one of; ARGV[1]: the lease in milliseconds.
# For each, 1 if renewed, 0 if it had expired or gone (never brought back: its slot may be taken again).
RENEW = (
    _NOW
    + _EXPIRE_WITH_LAST
    + """
local lease = tonumber(ARGV[1])
local renewed = {}
for i, key in ipairs(KEYS) do
  local holder = ARGV[i + 1]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZSCORE', key, holder) then
    redis.call('ZADD', key, 'XX', now + lease, holder)
    expire_with_last(key)
    renewed[i] = 1
  else
    renewed[i] = 0
  end
end
return renewed
"""
)

# KEYS[1]: the (host, model)'s leases. The live ones (expiring after now), without writing anything.
COUNT = (
    _NOW
    + """
return redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%d', now), '+inf')
"""
)


@dataclass(frozen=True, slots=True)
class Lease:
    host: str
    model: str
    holder: str
    key: str


class SlotLeases:
    """This process's slot leases: taking, renewing, giving back and counting them."""

    def __init__(self, link: RedisLink, prefix: str, lease_seconds: float) -> None:
        self._link = link
        self._prefix = prefix
        self.lease_seconds = lease_seconds
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self._process = secrets.token_hex(8)
        self._counter = count(1)
        client = link.client
        self._acquire = client.register_script(ACQUIRE)
        self._renew = client.register_script(RENEW)
        self._count = client.register_script(COUNT)
        self._held: dict[str, Lease] = {}
        self._renewer: asyncio.Task[None] | None = None

    def new_holder(self) -> str:
        """A holder id no other lease, in any replica, has."""
        return f"{self._process}:{next(self._counter)}"

    def key(self, host: str, model: str) -> str:
        # The host is quoted (no `:` left in it) so the key reads back one way: model names hold `:`.
        return f"{self._prefix}slots:{quote(host, safe='')}:{model}"

    @property
    def held(self) -> int:
        """Leases this process holds, as far as it knows."""
        return len(self._held)

    async def acquire(self, host: str, model: str, limit: int, holder: str) -> bool:
        """Take one of the (host, model)'s `limit` slots for `holder`, if one is free: whether it got one.
        RedisUnavailable if Redis did not answer."""
        key = self.key(host, model)
        got = await self._link.call(self._acquire(keys=[key], args=[limit, holder, self._lease_ms]))
        if got:
            self._held[holder] = Lease(host, model, holder, key)
            self._start_renewer()
        return bool(got)

    async def release(self, host: str, model: str, holder: str) -> bool:
        """Give `holder`'s slot back; whether Redis still had it. Releasing twice, or a lease that expired,
        is harmless. RedisUnavailable if Redis did not answer (the lease then expires)."""
        self._held.pop(holder, None)
        removed = await self._link.call(self._link.client.zrem(self.key(host, model), holder))
        return bool(removed)

    async def count(self, host: str, model: str) -> int:
        """Live leases on the (host, model), every replica's."""
        return int(await self._link.call(self._count(keys=[self.key(host, model)])))

    async def renew(self) -> list[Lease]:
        """Push back the expiry of every lease this process holds, in one round trip; the leases that were
        lost (expired before this renewal, or gone with Redis's data), which it no longer holds."""
        leases = list(self._held.values())
        if not leases:
            return []
        keys = [lease.key for lease in leases]
        holders = [lease.holder for lease in leases]
        renewed = await self._link.call(self._renew(keys=keys, args=[self._lease_ms, *holders]))
        # A lease released while the renewal ran is gone from `_held` too: released, not lost.
        lost = [
            lease
            for lease, kept in zip(leases, renewed, strict=True)
            if not kept and lease.holder in self._held
        ]
        for lease in lost:
            del self._held[lease.holder]
        if lost:
            logger.warning(
                "%d slot lease(s) expired before they were renewed (first: %s on %s); their slots may be "
                "taken by other requests",
                len(lost),
                lost[0].model,
                lost[0].host,
            )
        return lost

    def _start_renewer(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_while_held(), name="slot-lease-renewer")

    async def _renew_while_held(self) -> None:
        """Renew every third of the lease while any is held; then end (the next acquire starts another)."""
        while self._held:
            await asyncio.sleep(self.lease_seconds / 3)
            with suppress(RedisUnavailable):  # the link logged it; the next renewal tries again
                await self.renew()

    async def aclose(self) -> None:
        """Stop renewing and give back every lease still held (at shutdown; what can't be given back
        expires)."""
        if self._renewer is not None:
            self._renewer.cancel()
            with suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        for lease in list(self._held.values()):
            with suppress(RedisUnavailable):
                await self.release(lease.host, lease.model, lease.holder)
