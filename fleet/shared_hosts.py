"""Learned slots and host health, shared by every gateway replica through Redis (REDIS_URL, issue 14).

Replicas sharing one fair queue (fleet.shared_scheduler) each offer it their own view of the hosts
(`Hosts.candidates`). If each learned slots and ejected hosts on its own, one would offer the queue slots
another has learned are not there, and a host one found dead would keep getting the others' requests. So,
when REDIS_URL is set, what fleet.learning and fleet.health decide is decided in Redis, once, for all:

- **Learning slots** keeps fleet.learning's rules, run by a Lua script on the (host, model)'s observations
  in Redis: every replica's finished requests count (their `running` is the shared count of requests in
  flight there), the slots settle once, and never rise (a replica that learned a value alone, while Redis
  did not answer, may only lower the shared one). A learned value lasts LEARNED_SECONDS, then is learned
  again: it no longer ends with a gateway restart, and Ollama's OLLAMA_NUM_PARALLEL may have changed.
- **Health** keeps fleet.health's rules on one record per host in Redis, with times on Redis's clock: a
  failure (a request's or a periodic check's, on any replica) ejects it for every replica with one back-off
  doubling for them all; an answered check puts it on trial; and a success decides its return once: only a
  request sent after the back-off ended brings it back (checked in Redis), and the shared queue lets a host
  on trial run one request at a time across replicas, so one trial decides for everyone. "Out of service"
  and "back in service" are said by the replica that decided; the others note it at info level.
- **Taken up by publish/subscribe**: every change is published (`hosts`) and applied by each replica to its
  own `Hosts`, so an ejection reaches the others within a round trip, and the candidates the shared queue
  reads (synchronously, on every admission and release) cost no Redis call. Changes are rare (a failure, a
  return, a learned value), admissions are not: reading Redis when the candidates are built would add a
  round trip to every admission and every release, for state that changes a few times an hour. A message
  lost (a reconnect) or a value expired is caught by a full read at each periodic check and after every
  new subscription.
- **Keys are per host and what it is**: a host's id and its URL (for learned slots, also its configured
  slots), hashed; a host moved, or its slots set again, starts afresh, as fleet.admission does today, and
  replicas whose OLLAMA_URL list differs never mix two hosts under one id.
- **Redis unreachable**: each replica decides alone, exactly as without REDIS_URL (its own learning and
  health), said once per outage. Nothing fails open beyond that. When Redis answers again, what the replica
  found alone is written back the strict way (an ejection kept at least as long, slots only lowered), then
  the shared state is read and applied.

Keys under the prefix: `health:<host>:<url hash>` (a hash: `u` ejected until, ms on Redis's clock, absent
when healthy; `b` back-off ms; `f` failures in a row; `p` the problem; `v` its version), forgotten
HEALTH_MEMORY_SECONDS after its last change; `learned:<host>:<hash>` (a hash: model → `slots:expiry ms`),
expiring with its latest value; `learning:<host>:<hash>:<model>` (`ran`, `waits`: what was seen before the
slots settle), forgotten LEARNED_SECONDS after the last observation.
"""

import asyncio
import contextlib
import hashlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

from redis.exceptions import RedisError

from cluster.redis_link import RedisLink, RedisUnavailable
from fleet.health import BACKOFF_FIRST, BACKOFF_MAX
from fleet.hosts import Host, Hosts, shown_model
from fleet.learning import EVIDENCE, WAITED_SECONDS, SlotLearner

logger = logging.getLogger("gateway.fleet")

Arg = str | int | float

# A learned value is learned again after this: Ollama's slots change when it is restarted with another
# OLLAMA_NUM_PARALLEL, which the gateway is not told of; learning again costs a few requests waiting inside
# Ollama, as after a restart of a gateway without Redis.
LEARNED_SECONDS = 3600.0
# A health record outlives its last change by this: far more than BACKOFF_MAX, and every periodic check of
# a host still down writes it again.
HEALTH_MEMORY_SECONDS = 600.0
RESUBSCRIBE_PAUSE = 0.5
LISTEN_SECONDS = 1.0
CLOSE_WAIT = 2.0

_NOW = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
"""

# A model's live learned value in a `learned:` hash (an expired one is dropped), and setting one that only
# lowers it; the hash expires with its latest value.
_LEARNED = """
local function live_learned(key, model)
  local value = redis.call('HGET', key, model)
  if not value then return nil end
  local slots, at = string.match(value, '^(%d+):(%d+)$')
  if not slots or tonumber(at) <= now then
    redis.call('HDEL', key, model)
    return nil
  end
  return tonumber(slots), tonumber(at) - now
end

local function lower_learned(key, model, slots, at)
  local known, left = live_learned(key, model)
  if known and known <= slots then return known, left, false end
  redis.call('HSET', key, model, slots .. ':' .. at)
  local ttl = redis.call('PTTL', key)
  if ttl < 0 or now + ttl < at then redis.call('PEXPIREAT', key, at) end
  return slots, at - now, true
end
"""

# Every message: its kind, the replica that wrote it (which applies its own answer, not its message), the
# host id and hash, then what changed.

# KEYS: learning, learned. ARGV: model, requests in flight when it was sent, ms it waited in Ollama, the
# wait threshold ms, the evidence needed, LEARNED ms, channel, host id, hash, replica.
# {1 if this observation settled the slots, slots or -1, ms left or -1}.
OBSERVE = (
    _NOW
    + _LEARNED
    + """
local learning, learned = KEYS[1], KEYS[2]
local model, sent, waited = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local threshold, evidence, keep = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local known, left = live_learned(learned, model)
if known then return {0, known, left} end
local ran = tonumber(redis.call('HGET', learning, 'ran') or '0')
if waited < threshold then
  if sent > ran then redis.call('HSET', learning, 'ran', sent) end
  redis.call('PEXPIRE', learning, keep)
  return {0, -1, -1}
end
if sent <= ran then return {0, -1, -1} end
local waits = redis.call('HINCRBY', learning, 'waits', 1)
redis.call('PEXPIRE', learning, keep)
if waits < evidence then return {0, -1, -1} end
local slots = math.max(ran, 1)
redis.call('DEL', learning)
lower_learned(learned, model, slots, now + keep)
local message = {'learned', ARGV[10], ARGV[8], ARGV[9], model, slots, keep}
redis.call('PUBLISH', ARGV[7], table.concat(message, '\\n'))
return {1, slots, keep}
"""
)

# KEYS: learned. ARGV: model, slots learned alone, LEARNED ms, channel, host id, hash, replica.
# {slots, ms left}.
LOWER = (
    _NOW
    + _LEARNED
    + """
local model = ARGV[1]
local slots, left, changed = lower_learned(KEYS[1], model, tonumber(ARGV[2]), now + tonumber(ARGV[3]))
if changed then
  local message = {'learned', ARGV[7], ARGV[5], ARGV[6], model, slots, left}
  redis.call('PUBLISH', ARGV[4], table.concat(message, '\\n'))
end
return {slots, left}
"""
)

# A health record as replicas read it: {version, epoch, ejected 1/0, ms until the back-off ends (negative:
# on trial), back-off ms, failures, problem}; and its change, kept and published. The epoch is when the
# record was made: versions start again with a record made again (forgotten, or Redis lost its data).
_HEALTH = """
local function record(key)
  local f = redis.call('HMGET', key, 'v', 'e', 'u', 'b', 'f', 'p')
  local ejected, left = 0, 0
  if f[3] then ejected, left = 1, tonumber(f[3]) - now end
  return {tonumber(f[1] or '0'), f[2] or '', ejected, left, tonumber(f[4] or '0'), tonumber(f[5] or '0'),
    f[6] or ''}
end

local function changed(key)
  if redis.call('HINCRBY', key, 'v', 1) == 1 then redis.call('HSET', key, 'e', now) end
  redis.call('PEXPIRE', key, ARGV[1])
  local r = record(key)
  redis.call('PUBLISH', ARGV[2], table.concat({'health', ARGV[5], ARGV[3], ARGV[4], unpack(r)}, '\\n'))
  return r
end
"""

# Every health script: KEYS: the host's record. ARGV: memory ms, channel, host id, hash, replica, then its
# own.
# Replies {1 if this call changed whether the host is in service, the record...}.

# ARGV[6..]: problem, BACKOFF_FIRST ms, BACKOFF_MAX ms. fleet.health's `failed`.
FAIL = (
    _NOW
    + _HEALTH
    + """
local key = KEYS[1]
local was_healthy = redis.call('HEXISTS', key, 'u') == 0
local backoff = tonumber(redis.call('HGET', key, 'b') or '0')
backoff = math.min(math.max(backoff * 2, tonumber(ARGV[7])), tonumber(ARGV[8]))
redis.call('HINCRBY', key, 'f', 1)
redis.call('HSET', key, 'u', now + backoff, 'b', backoff, 'p', ARGV[6])
return {was_healthy and 1 or 0, unpack(changed(key))}
"""
)

# ARGV[6]: ms since the request was sent. fleet.health's `succeeded`, for a request sent on trial only:
# after the latest back-off ended (a request sent before says nothing of the host since).
SUCCEED = (
    _NOW
    + _HEALTH
    + """
local key = KEYS[1]
local ejected_until = tonumber(redis.call('HGET', key, 'u') or '-1')
if ejected_until < 0 or now - tonumber(ARGV[6]) < ejected_until then return {0, unpack(record(key))} end
redis.call('HDEL', key, 'u', 'p')
redis.call('HSET', key, 'b', 0, 'f', 0)
return {1, unpack(changed(key))}
"""
)

# fleet.health's `answered_check`: an ejected host may take its trial now.
ANSWERED = (
    _NOW
    + _HEALTH
    + """
local key = KEYS[1]
local ejected_until = tonumber(redis.call('HGET', key, 'u') or '-1')
if ejected_until <= now then return {0, unpack(record(key))} end
redis.call('HSET', key, 'u', now)
return {0, unpack(changed(key))}
"""
)

# ARGV[6..]: ms left of this replica's own ejection, its back-off ms, failures, problem. An ejection decided
# while Redis did not answer, written back the strict way: ejected at least as long.
MERGE = (
    _NOW
    + _HEALTH
    + """
local key = KEYS[1]
local f = redis.call('HMGET', key, 'u', 'b', 'f')
local was_healthy = not f[1]
local ejected_until = math.max(tonumber(f[1] or '0'), now + tonumber(ARGV[6]))
local backoff = math.max(tonumber(f[2] or '0'), tonumber(ARGV[7]))
local failures = math.max(tonumber(f[3] or '0'), tonumber(ARGV[8]))
redis.call('HSET', key, 'u', ejected_until, 'b', backoff, 'f', failures, 'p', ARGV[9])
return {was_healthy and 1 or 0, unpack(changed(key))}
"""
)

# KEYS: per host, its health record and its learned values. Per host {record, {model, slots, ms left,
# ...}}.
READ = (
    _NOW
    + _LEARNED
    + _HEALTH
    + """
local answer = {}
for i = 1, #KEYS, 2 do
  local learned = {}
  for _, model in ipairs(redis.call('HKEYS', KEYS[i + 1])) do
    local slots, left = live_learned(KEYS[i + 1], model)
    if slots then
      learned[#learned + 1] = model
      learned[#learned + 1] = slots
      learned[#learned + 1] = left
    end
  end
  answer[#answer + 1] = {record(KEYS[i]), learned}
end
return answer
"""
)


def _digest(*parts: object) -> str:
    return hashlib.sha256("\n".join(map(str, parts)).encode()).hexdigest()[:16]


def health_hash(host: Host) -> str:
    """What a host's health is about: the host at its address (never its credentials)."""
    return _digest(host.id, host.upstream.public_url)


def learned_hash(host: Host) -> str:
    """What a host's learned slots are about: the host at its address, with its configured slots (set again,
    they are learned afresh)."""
    return _digest(host.id, host.upstream.public_url, host.config.slots)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class SharedHosts:
    """This replica's part in the shared health and learned slots: writes what it sees, applies what any
    replica decided to its own `Hosts`."""

    def __init__(
        self,
        hosts: Hosts,
        link: RedisLink,
        prefix: str,
        *,
        learn_alone: Callable[[Host, str, int, float], bool],
        on_change: Callable[[], None],
        learned_seconds: float = LEARNED_SECONDS,
        memory_seconds: float = HEALTH_MEMORY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._hosts = hosts
        self._link = link
        self._prefix = prefix
        self._learn_alone = learn_alone
        self._on_change = on_change
        self._learned_ms = max(1, round(learned_seconds * 1000))
        self._memory_ms = max(1, round(memory_seconds * 1000))
        self._clock = clock
        self.channel = f"{prefix}hosts"
        self.replica = secrets.token_hex(8)
        client = link.client
        self._observe = client.register_script(OBSERVE)
        self._lower = client.register_script(LOWER)
        self._fail = client.register_script(FAIL)
        self._succeed = client.register_script(SUCCEED)
        self._answered = client.register_script(ANSWERED)
        self._merge = client.register_script(MERGE)
        self._read = client.register_script(READ)
        self._versions: dict[str, tuple[str, str, int]] = {}  # host id: (health hash, epoch, version)
        self._pending: Counter[str] = Counter()  # health writes under way, per host id
        self._learned_alone: set[tuple[str, str, str]] = set()  # (host id, hash, model)
        self._alone = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self._syncing: asyncio.Task[None] | None = None

    @property
    def alone(self) -> bool:
        """Whether this replica decides on its own now (Redis did not answer)."""
        return self._alone

    # -- starting and stopping -------------------------------------------------------------------------------

    def start(self) -> None:
        """Listen to the other replicas' changes, in the background, until `aclose`."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="shared-hosts-listener")

    async def aclose(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_WAIT)
        for task in (self._listener, self._syncing):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- what this replica saw -------------------------------------------------------------------------------

    def failed(self, host: Host, problem: str, newly: bool) -> None:
        """The host failed a request or a check here, and is ejected here already (`newly`: it was in
        service here): eject it for every replica."""
        extra: list[Arg] = [problem, round(BACKOFF_FIRST * 1000), round(BACKOFF_MAX * 1000)]
        self._spawn(self._write_health(host, self._fail, extra, alone=self._say_out if newly else None))

    def succeeded(self, host: Host, sent_ago: float) -> None:
        """A request sent to the host on trial `sent_ago` seconds ago succeeded: it is back here already;
        back for every replica, if it was sent after the back-off Redis knows of."""
        self._spawn(self._write_health(host, self._succeed, [round(sent_ago * 1000)], alone=self._say_back))

    def answered(self, host: Host) -> None:
        """An ejected host answered a periodic check here: on trial for every replica."""
        self._spawn(self._write_health(host, self._answered, [], alone=None))

    def observe(self, host: Host, model: str, running: int, waited: float | None) -> None:
        """A request finished with counters that tell a wait from work: fleet.learning's `observe`, shared
        (or here alone while Redis does not answer). The scheduler hears of slots learned."""
        if waited is None:
            return  # fleet.learning ignores it too
        self._spawn(self._observe_shared(host, model, running, waited))

    # -- reading everything ----------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Write back what was decided alone (if Redis did not answer before), then read every host's
        health and learned slots and apply them: a lost message, or a value expired, is caught here."""
        hosts = list(self._hosts)
        try:
            if self._alone:
                await self._write_back(hosts)
            keys: list[str] = []
            for host in hosts:
                keys += [self._health_key(host), self._learned_key(host)]
            answer = await self._link.call(self._read(keys=keys)) if hosts else []
        except RedisUnavailable:
            self._unavailable()
            return
        if self._alone:
            self._alone = False
            logger.warning(
                "host health and learned slots are shared again (Redis at %s answers)", self._link.name
            )
        changed = False
        for host, (record, learned) in zip(hosts, answer, strict=True):
            if self._hosts.by_id.get(host.id) is not host:
                continue  # replaced meanwhile
            if not self._pending[host.id]:
                changed = self._apply_health(host, health_hash(host), record, read=True) or changed
            changed = self._apply_all_learned(host, learned) or changed
        if changed:
            self._on_change()

    def resync(self) -> None:
        """`sync` in the background (once at a time)."""
        if self._syncing is None or self._syncing.done():
            self._syncing = asyncio.get_running_loop().create_task(self.sync())

    # -- writing ---------------------------------------------------------------------------------------------

    def _health_key(self, host: Host) -> str:
        return f"{self._prefix}health:{quote(host.id, safe='')}:{health_hash(host)}"

    def _learned_key(self, host: Host) -> str:
        return f"{self._prefix}learned:{quote(host.id, safe='')}:{learned_hash(host)}"

    def _health_args(self, host: Host) -> list[Arg]:
        return [self._memory_ms, self.channel, host.id, health_hash(host), self.replica]

    async def _write_health(
        self, host: Host, script: Any, extra: list[Arg], alone: Callable[[Host], None] | None
    ) -> None:
        """Run a health script; apply its answer (said by this replica if it changed whether the host is in
        service). Redis not answering: what was decided here stands (`alone` says it, as without Redis)."""
        self._pending[host.id] += 1
        try:
            reply = await self._link.call(
                script(keys=[self._health_key(host)], args=[*self._health_args(host), *extra])
            )
        except RedisUnavailable:
            self._unavailable()
            if alone is not None:
                alone(host)
            return
        finally:
            self._pending[host.id] -= 1
            if not self._pending[host.id]:
                del self._pending[host.id]
        self._available()
        decided, record = int(reply[0]), reply[1:]
        if self._hosts.by_id.get(host.id) is not host:
            return
        if decided:
            (self._say_back if int(record[2]) == 0 else self._say_out)(host)
        if self._apply_health(host, health_hash(host), record, decided=bool(decided)):
            self._on_change()

    async def _observe_shared(self, host: Host, model: str, running: int, waited: float) -> None:
        args: list[Arg] = [
            model,
            running,
            round(waited * 1000),
            round(WAITED_SECONDS * 1000),
            EVIDENCE,
            self._learned_ms,
            self.channel,
            host.id,
            learned_hash(host),
            self.replica,
        ]
        keys = [
            f"{self._prefix}learning:{quote(host.id, safe='')}:{learned_hash(host)}:{model}",
            self._learned_key(host),
        ]
        try:
            settled, slots, _left = await self._link.call(self._observe(keys=keys, args=args))
        except RedisUnavailable:
            self._unavailable()
            if self._learn_alone(host, model, running, waited):
                self._learned_alone.add((host.id, learned_hash(host), model))
                self._on_change()
            return
        self._available()
        if int(slots) >= 0 and self._apply_learned(host, model, int(slots), by_me=bool(settled)):
            self._on_change()

    async def _write_back(self, hosts: list[Host]) -> None:
        """What this replica decided alone, into Redis: its ejections (at least as long), its slots learned
        (only lowering the shared ones). RedisUnavailable if Redis does not answer."""
        now = self._clock()
        for host in hosts:
            health = host.health
            if health.ejected_until is not None:
                left = max(round((health.ejected_until - now) * 1000), 0)
                extra: list[Arg] = [left, round(health.backoff * 1000), health.failures, health.problem or ""]
                merged = [*self._health_args(host), *extra]
                await self._link.call(self._merge(keys=[self._health_key(host)], args=merged))
        for host_id, learned, model in sorted(self._learned_alone):
            known = self._hosts.by_id.get(host_id)
            learner = known.learners.get(model) if known is not None else None
            if known is None or learner is None or learner.learned is None or learned_hash(known) != learned:
                continue
            lowered: list[Arg] = [
                model,
                learner.learned,
                self._learned_ms,
                self.channel,
                known.id,
                learned,
                self.replica,
            ]
            await self._link.call(self._lower(keys=[self._learned_key(known)], args=lowered))
        self._learned_alone.clear()

    # -- applying what Redis says ----------------------------------------------------------------------------

    def _apply_health(
        self, host: Host, hashed: str, record: list[Any], read: bool = False, decided: bool = False
    ) -> bool:
        """Make the host's health here the record (version, epoch, ejected, ms left, back-off ms, failures,
        problem), unless older than the one applied; True when that put the host back in service here. A
        full read also applies the same version again, and no record at all (forgotten: healthy)."""
        version, epoch = int(record[0]), _text(record[1])
        known = self._versions.get(host.id)
        if known is not None and known[:2] == (hashed, epoch) and known[2] >= version + int(read):
            return False
        if version == 0 and not read:
            return False
        self._versions[host.id] = (hashed, epoch, version)
        health = host.health
        was_healthy = health.healthy
        if int(record[2]):
            health.ejected_until = self._clock() + int(record[3]) / 1000
            health.backoff = int(record[4]) / 1000
            health.failures = int(record[5])
            health.problem = _text(record[6]) or None
            if was_healthy and not decided:
                logger.info(
                    "Ollama host %s is out of service (another replica found): %s", host.name, health.problem
                )
            return False
        health.succeeded()
        if not was_healthy and not decided:
            logger.info("Ollama host %s is back in service (a trial on another replica)", host.name)
        return not was_healthy

    def _apply_all_learned(self, host: Host, learned: list[Any]) -> bool:
        """The host's learned slots here become Redis's: new ones taken up, expired ones forgotten (those
        learned alone and not yet written back stay)."""
        values = {_text(learned[i]): int(learned[i + 1]) for i in range(0, len(learned), 3)}
        changed = False
        for model, slots in values.items():
            changed = self._apply_learned(host, model, slots) or changed
        hashed = learned_hash(host)
        for model, learner in list(host.learners.items()):
            learned_here = (host.id, hashed, model) in self._learned_alone
            if learner.learned is not None and model not in values and not learned_here:
                host.learners[model] = SlotLearner()  # expired: learned again
                changed = True
        return changed

    def _apply_learned(self, host: Host, model: str, slots: int, by_me: bool = False) -> bool:
        learner = host.learners.setdefault(model, SlotLearner())
        if learner.learned == slots:
            return False
        learner.learned = slots
        plural = "" if slots == 1 else "s"
        if by_me:
            logger.warning(
                "learned from Ollama's timings: host %s runs %d request%s at once for %s; the gateways now "
                "hold the rest in their queue (for %g minutes, or until the host's slots are set again)",
                host.name,
                slots,
                plural,
                shown_model(model),
                self._learned_ms / 60000,
            )
        else:
            logger.info(
                "learned by another replica: host %s runs %d request%s at once for %s",
                host.name,
                slots,
                plural,
                shown_model(model),
            )
        return True

    def _apply_message(self, data: str) -> None:
        kind, origin, host_id, hashed, *fields = data.split("\n", 10 if data.startswith("health") else 6)
        host = self._hosts.by_id.get(host_id)
        if host is None or origin == self.replica:
            return  # this replica applies its own change from the script's answer
        if kind == "health" and hashed == health_hash(host):
            if self._apply_health(host, hashed, fields):
                self._on_change()
        elif (
            kind == "learned"
            and hashed == learned_hash(host)
            and self._apply_learned(host, fields[0], int(fields[1]))
        ):
            self._on_change()

    # -- the subscription ------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        """The hosts channel, subscribed again whenever the connection breaks; each new subscription is
        followed by a full read (what was published meanwhile)."""
        while True:
            pubsub = self._link.client.pubsub()
            try:
                await pubsub.subscribe(self.channel)
                await self._confirmed(pubsub)
                self.subscribed.set()
                self.resync()
                while True:
                    if self._alone and self._link.up:
                        self.resync()  # a write back that failed is tried again, every LISTEN_SECONDS
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LISTEN_SECONDS)
                    if message is not None and message.get("type") == "message":
                        self._apply_message(_text(message["data"]))
            except (RedisError, OSError, TimeoutError):
                self.subscribed.clear()
                if await self._link.check() != "up":
                    self._unavailable()
                await asyncio.sleep(RESUBSCRIBE_PAUSE)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    @staticmethod
    async def _confirmed(pubsub: Any) -> None:
        """Until Redis confirms the subscription: the full read that follows must not run before it, or a
        change published in between would be missed by both."""
        async with asyncio.timeout(LISTEN_SECONDS):
            while True:
                message = await pubsub.get_message(timeout=LISTEN_SECONDS)
                if message is not None and message.get("type") in ("subscribe", b"subscribe"):
                    return

    # -- saying it -------------------------------------------------------------------------------------------

    def _unavailable(self) -> None:
        if self._alone:
            return
        self._alone = True
        logger.warning(
            "host health and learned slots are this replica's own while Redis at %s does not answer (each "
            "replica ejects hosts and learns slots alone, as a single gateway does)",
            self._link.name,
        )

    def _available(self) -> None:
        if self._alone:
            self.resync()  # writes back what was decided alone, and says it once

    @staticmethod
    def _say_out(host: Host) -> None:
        logger.warning("Ollama host %s is out of service: %s", host.name, host.health.problem)

    @staticmethod
    def _say_back(host: Host) -> None:
        logger.warning("Ollama host %s is back in service", host.name)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


__all__ = ["SharedHosts"]
