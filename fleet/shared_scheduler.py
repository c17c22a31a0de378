"""The fair queue and the slots, shared by every gateway replica through Redis (REDIS_URL, issue 14).

Each replica running fleet.scheduler on its own would admit a host's slots once per replica, and keep a
fair queue per replica that a person flooding one replica while their colleague uses another would win.
So when REDIS_URL is set, the state fleet.scheduler keeps in memory lives in Redis instead, and the N
replicas behave as one scheduler: the same public interface, the same rules (bands, start-time fair
queueing over people in slot-seconds, one person's requests in order, caps, timeouts), one queue per model.

How, and why:
- **One script decides.** Who goes next and taking their slot are one Lua script (fleet.queue_scripts),
  run alone by Redis: no two replicas can hand out the same slot. Enqueueing runs it (a request that can go
  at once goes), and so does every release, in the same step as the slot is given back: dispatch stays
  work-conserving and immediate across replicas. The hosts that may serve the model (and their slots) are
  the calling replica's view (fleet.hosts), passed to the script, so the script needs no copy of the hosts.
- **The replica holding the connection learns of a grant by publish/subscribe** (a channel per replica),
  not by polling: a slot freed on one replica reaches a waiter on another within a round trip or two. The
  waiter's record in Redis says whether it was granted, so a message lost (a reconnect) strands nothing:
  the replica asks again when its subscription comes back, and every renewal (a third of LEASE_SECONDS)
  reads the state of everything it holds.
- **Everything a replica holds expires unless renewed** (waiters, grants, in-flight and waiting counts, its
  heartbeat), each member scored with its expiry on Redis's clock: a replica killed with SIGKILL runs no
  clean-up, so its slots and counts come back within LEASE_SECONDS and its waiters are dropped from the
  queue as they reach its head, unseen by anyone else.
- **A grant the waiter can no longer take is given back** by its replica: a client that left, or a wait
  that timed out, withdraws its request in one step that either removes it from the queue or returns the
  grant made in that very instant (then used, for a timeout, or released).
- **Degraded mode, never failing open silently.** While Redis does not answer (cluster.redis_link), each
  replica admits through a local fleet.scheduler whose slots are each host's divided by the replicas last
  seen alive (at least one; a host with fewer slots than replicas may then run one per replica), minus the
  shared grants this replica still runs there. It is logged once per outage and every admission it makes
  is counted (`gateway_degraded_admissions_total`). Requests waiting in Redis when it fails move to the
  local queue, keeping what is left of their wait: their clients did nothing wrong, and a 503 would send
  them all back at once. So a host runs at most its slots plus the other replicas' shares while the shared
  requests of before the outage run (a replica cannot see the others' then), and the replicas' shares
  after that.
- **Recovery counts what still runs.** When Redis answers again, a replica first records in Redis the
  local grants it still runs, and every shared grant whose record Redis lost (a restart without
  persistence), as granted (the ADOPT script): they are renewed and released as any grant, and the shared
  queue hands out only the slots they leave. Requests waiting in the local queue join the shared queue,
  keeping what is left of their wait. A replica learns that Redis is back at its next call or renewal (a
  third of LEASE_SECONDS at most): until then, what it admits locally is not counted by the others.

What `inflight`, `waiting` and friends show is this replica's part (Prometheus sums the replicas' gauges);
`cost_of` is the shared average, as last read. `try_acquire` never grants: every request goes through
Redis.
"""

import asyncio
import contextlib
import logging
import random
import secrets
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, replace
from itertools import count
from typing import Any
from urllib.parse import quote

from prometheus_client import Counter
from redis.exceptions import RedisError

from cluster.redis_link import REGISTRY, RedisLink, RedisUnavailable
from fleet import queue_scripts
from fleet.scheduler import Ask, Candidate, Grant, Limits, Refused, Scheduler

logger = logging.getLogger("gateway.scheduler")

# How long a request waits for this replica's subscription before it joins the queue anyway (a grant
# published meanwhile is then read at the next renewal).
SUBSCRIBE_WAIT = 1.0
RESUBSCRIBE_PAUSE = 0.2
# The pub/sub connection's read: short enough to notice closing soon.
LISTEN_SECONDS = 1.0
CLOSE_WAIT = 2.0
SHUTTING_DOWN = "the gateway is shutting down"


class _DegradedMetrics:
    def __init__(self) -> None:
        self.admissions = Counter(
            "gateway_degraded_admissions",
            "Model calls admitted with local slots (a share of each host's) while Redis did not answer",
            registry=REGISTRY,
        )


_metrics: _DegradedMetrics | None = None


def _degraded_metrics() -> _DegradedMetrics:
    """Made with the first shared scheduler: a gateway without REDIS_URL shows none."""
    global _metrics
    if _metrics is None:
        _metrics = _DegradedMetrics()
    return _metrics


@dataclass(eq=False)
class SharedGrant(Grant):
    """A grant from the shared queue: `holder` is its id in Redis (its waiter's, then its leases')."""

    holder: str = ""


class _MovedLocal(Exception):
    """Redis stopped answering while the request waited there: it waits in the local queue instead."""


class _Requeue(Exception):
    """Redis no longer knows the waiting request (its data was lost): it joins the queue again."""


class _BackToShared(Exception):
    """Redis answers again while the request waits in the local queue: it joins the shared queue."""


@dataclass(eq=False)
class _Local:
    """A grant from the local queue (admitted while Redis did not answer), and its id in Redis once it is
    counted there (`adopted`)."""

    holder: str
    grant: Grant
    adopted: bool = False


@dataclass(eq=False)
class _Waiter:
    ask: Ask
    future: asyncio.Future[Grant]
    since: float
    queued: bool = False  # the enqueue script answered: renewals may ask about it


class SharedScheduler:
    def __init__(
        self,
        candidates: Callable[[str], Iterable[Candidate]],
        link: RedisLink,
        prefix: str,
        lease_seconds: float,
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._candidates = candidates
        self._link = link
        self._prefix = prefix
        self.lease_seconds = lease_seconds
        self._lease_ms = max(1, round(lease_seconds * 1000))
        self.limits = limits or Limits()
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 (breaking ties between hosts, not a secret)
        self.replica = secrets.token_hex(8)
        self._channel = f"{prefix}replica:{self.replica}"
        self._ids = count(1)
        client = link.client
        self._enqueue = client.register_script(queue_scripts.ENQUEUE)
        self._withdraw = client.register_script(queue_scripts.WITHDRAW)
        self._release = client.register_script(queue_scripts.RELEASE)
        self._dispatch = client.register_script(queue_scripts.DISPATCH)
        self._renew = client.register_script(queue_scripts.RENEW)
        self._leave = client.register_script(queue_scripts.LEAVE)
        self._adopt = client.register_script(queue_scripts.ADOPT)
        self._waiters: dict[str, _Waiter] = {}
        self._grants: dict[str, SharedGrant] = {}
        self._own: dict[tuple[str, str], int] = {}  # this replica's shared grants by (host, model)
        self._locals: list[_Local] = []  # grants from the local queue still running
        self._withdrawing: set[str] = set()
        self._costs: dict[str, float] = {}
        self._replicas_seen = 1
        self._fallback = Scheduler(self._local_candidates, self.limits, clock, self._rng)
        self._degraded = False
        self._shared_back = asyncio.Event()  # set while not degraded: what local waiters wait for too
        self._shared_back.set()
        self._subscribed = asyncio.Event()
        self._listener: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._metrics = _degraded_metrics()

    # -- starting and stopping -------------------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe to this replica's channel and renew what it holds, in the background, until `aclose`."""
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="shared-queue-listener")
            self._renewer = asyncio.create_task(self._renew_forever(), name="shared-queue-renewer")

    def close(self) -> None:
        """Refuse every waiter (503) and every new request: the gateway is stopping."""
        self._closed = True
        self._fallback.close()
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(Refused(503, SHUTTING_DOWN, 1))

    async def aclose(self) -> None:
        """After `close`: let the give-backs under way finish (briefly), stop the background tasks, and
        leave the replicas (what this replica still holds expires)."""
        self.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=CLOSE_WAIT)
        for task in (self._listener, self._renewer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(RedisUnavailable):
            await self._call(self._leave, self.replica)

    # -- asking and giving back ------------------------------------------------------------------------------

    def try_acquire(self, ask: Ask) -> Grant | None:
        """Never at once: every request goes through Redis (`acquire`)."""
        return None

    async def acquire(self, ask: Ask) -> Grant:
        """A slot for `ask`: at once if one is free for it, else when its turn comes, across every replica;
        while Redis does not answer, from this replica's share of the slots. Raises Refused."""
        if self._closed:
            raise Refused(503, SHUTTING_DOWN, retry_after=1)
        since = self._clock()
        deadline = since + self.limits.timeout(ask.band)
        while True:
            try:
                if not self._shared_usable():
                    return await self._acquire_locally(ask, since, deadline)
                return await self._acquire_shared(ask, since, deadline)
            except (_MovedLocal, _Requeue, _BackToShared):
                continue

    def release(self, grant: Grant, slot_seconds: float | None = None) -> None:
        """Give the slot back (the next waiter, on any replica, gets it in the same step in Redis).
        `slot_seconds`: what the request really used, which corrects the person's charge; None: the time
        the slot was held."""
        if grant.released:
            return
        if not isinstance(grant, SharedGrant):
            self._release_local(grant, slot_seconds)
            return
        grant.released = True
        used = slot_seconds if slot_seconds is not None else max(self._clock() - grant.started, 0.0)
        self._forget_grant(grant)
        self._spawn(self._give_back(grant.holder, grant.model, used, slot_seconds))
        if self._degraded:
            self._fallback.refresh([grant.model])  # this replica's local share grew

    def refresh(self, models: Iterable[str] | None = None) -> None:
        """Slots may have appeared (a host back, added or raised; slots learned): dispatch who can go."""
        wanted = None if models is None else list(models)
        self._fallback.refresh(wanted)
        if not self._closed and not self._degraded and self._link.up:
            self._spawn(self._refresh(wanted))

    # -- what it shows ---------------------------------------------------------------------------------------

    def inflight(self, host: str, model: str) -> int:
        return self._own.get((host, model), 0) + self._fallback.inflight(host, model)

    def inflight_by_slot(self) -> dict[tuple[str, str], int]:
        counts = dict(self._own)
        for slot, running in self._fallback.inflight_by_slot().items():
            counts[slot] = counts.get(slot, 0) + running
        return counts

    def waiting(self, model: str | None = None) -> dict[str, int]:
        """Requests this replica holds waiting, by band label (for one model, or all)."""
        counts = self._fallback.waiting(model)
        for waiter in self._waiters.values():
            if model is None or waiter.ask.model == model:
                counts[waiter.ask.band.label] += 1
        return counts

    def waiting_models(self) -> dict[str, int]:
        counts = self._fallback.waiting_models()
        for waiter in self._waiters.values():
            counts[waiter.ask.model] = counts.get(waiter.ask.model, 0) + 1
        return counts

    def cost_of(self, model: str) -> float:
        """The slot-seconds a request for `model` usually takes (the replicas' shared running average)."""
        cost = self._costs.get(model)
        return cost if cost is not None else self._fallback.cost_of(model)

    # -- the shared path -------------------------------------------------------------------------------------

    async def _acquire_shared(self, ask: Ask, since: float, deadline: float) -> Grant:
        self.start()
        try:
            await self._adopt_locals()
        except RedisUnavailable:
            self._degrade()
            raise _MovedLocal from None
        if not self._subscribed.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SUBSCRIBE_WAIT):
                    await self._subscribed.wait()
        holder = f"{self.replica}:{next(self._ids)}"
        waiter = _Waiter(ask, asyncio.get_running_loop().create_future(), since)
        self._waiters[holder] = waiter
        try:
            reply = await self._call(self._enqueue, *self._enqueue_args(holder, ask))
        except RedisUnavailable:
            # Its record may have been written (the answer lost): it expires, unrenewed, as would a grant.
            self._waiters.pop(holder, None)
            self._degrade()
            raise _MovedLocal from None
        except asyncio.CancelledError:
            self._abandon(holder, waiter)
            raise
        waiter.queued = True
        status = _text(reply[0])
        self._note_cost(ask.model, reply[-1])
        if status == "granted":
            self._deliver(holder, reply[1:5])
        elif status == "refused":
            self._waiters.pop(holder, None)
            raise self._refused_for_waiting(ask, _text(reply[1]))
        try:
            async with asyncio.timeout(max(deadline - self._clock(), 0.0)):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            if _granted(waiter.future):  # in the very instant the time ran out
                return waiter.future.result()
            grant = await self._withdraw_waiter(holder, waiter)
            if grant is not None:
                return grant
            timeout = self.limits.timeout(ask.band)
            message = f"no slot for this model came free within {timeout:g} s"
            raise Refused(503, message, _retry_after(self.cost_of(ask.model))) from None
        except (asyncio.CancelledError, Refused):
            self._abandon(holder, waiter)
            raise

    def _enqueue_args(self, holder: str, ask: Ask) -> list[object]:
        limits = self.limits
        user_inflight = limits.user_inflight if ask.user_inflight is None else ask.user_inflight or None
        user_waiting = limits.user_waiting if ask.user_waiting is None else ask.user_waiting or None
        key = "" if ask.key is None else quote(ask.key, safe="")
        return [
            holder,
            self.replica,
            ask.model,
            int(ask.band),
            quote(ask.user, safe=""),
            key,
            _cap(user_inflight),
            _cap(limits.key_inflight),
            _cap(user_waiting),
            _cap(limits.key_waiting),
            "\n".join(sorted(ask.avoid)),
            *self._candidate_args(ask.model),
        ]

    def _refused_for_waiting(self, ask: Ask, which: str) -> Refused:
        retry = _retry_after(self.cost_of(ask.model))
        if which == "key":
            return Refused(429, f"this API key already has {self.limits.key_waiting} requests waiting", retry)
        cap = self.limits.user_waiting if ask.user_waiting is None else ask.user_waiting
        return Refused(429, f"you already have {cap} requests waiting", retry)

    def _candidate_args(self, model: str) -> list[object]:
        """The calling replica's view of the hosts for `model`, for the scripts. Slots this replica's local
        grants (made while Redis did not answer, still running) hold, and that Redis does not count yet, are
        not offered."""
        local: dict[tuple[str, str], int] = {}
        for entry in self._locals:
            if not entry.adopted:
                slot = (entry.grant.host, entry.grant.model)
                local[slot] = local.get(slot, 0) + 1
        args: list[object] = []
        candidates = list(self._candidates(model))
        args.append(len(candidates))
        for candidate in candidates:
            slots = candidate.slots
            if slots is not None and local:
                slots = max(slots - local.get((candidate.host, model), 0), 0)
            args += [
                candidate.host,
                quote(candidate.host, safe=""),
                -1 if slots is None else slots,
                int(candidate.loaded),
                int(candidate.trial),
            ]
        return args

    def _deliver(self, holder: str, fields: list[Any]) -> None:
        """The waiter `holder` was granted (by the enqueue script, a message, or a renewal's answer,
        whichever comes first; fields: host, charged, running, model). A grant for a waiter this replica no
        longer waits for (gone, shutting down) is given back."""
        waiter = self._waiters.pop(holder, None)
        if waiter is not None and not waiter.future.done():
            waiter.future.set_result(self._make_grant(holder, waiter.ask, fields, waiter.since))
            return
        if waiter is None and (holder in self._withdrawing or holder in self._grants):
            return  # already known, or being withdrawn (which gives it back)
        model = _text(fields[3]) if len(fields) > 3 else ""
        self._spawn(self._give_back(holder, model, 0.0, None))

    def _make_grant(self, holder: str, ask: Ask, fields: list[Any], since: float) -> SharedGrant:
        host, charged, running = _text(fields[0]), float(_text(fields[1])), int(_text(fields[2]))
        now = self._clock()
        grant = SharedGrant(host, ask.model, ask, charged, now - since, now, running, holder=holder)
        self._grants[holder] = grant
        slot = (host, ask.model)
        self._own[slot] = self._own.get(slot, 0) + 1
        return grant

    def _forget_grant(self, grant: SharedGrant) -> None:
        if self._grants.pop(grant.holder, None) is None:
            return
        slot = (grant.host, grant.model)
        left = self._own.get(slot, 0) - 1
        if left > 0:
            self._own[slot] = left
        else:
            self._own.pop(slot, None)

    async def _withdraw_waiter(self, holder: str, waiter: _Waiter) -> SharedGrant | None:
        """Out of the queue; or the grant made in that same instant (registered here, for the caller to use
        or give back). None if Redis did not answer: its record then expires."""
        self._waiters.pop(holder, None)
        self._withdrawing.add(holder)
        try:
            reply = await self._call(self._withdraw, holder)
        except RedisUnavailable:
            return None
        finally:
            self._withdrawing.discard(holder)
        if _text(reply[0]) != "granted":
            return None
        return self._make_grant(holder, waiter.ask, reply[1:5], waiter.since)

    def _abandon(self, holder: str, waiter: _Waiter) -> None:
        """The request stops waiting without a slot (its client left, the gateway stops): a grant already
        delivered goes back; else it leaves the queue, in the background (whatever cancels the caller must
        not cut it short), and a grant made in that instant goes back."""
        self._waiters.pop(holder, None)
        if _granted(waiter.future):
            self.release(waiter.future.result(), slot_seconds=0.0)
            return

        async def withdraw() -> None:
            grant = await self._withdraw_waiter(holder, waiter)
            if grant is not None:
                self.release(grant, slot_seconds=0.0)

        self._withdrawing.add(holder)  # a message for it meanwhile is not a stray grant
        self._spawn(withdraw())

    async def _give_back(self, holder: str, model: str, used: float, measured: float | None) -> None:
        try:
            cost = await self._call(
                self._release,
                holder,
                model,
                repr(used),
                "" if measured is None else repr(measured),
                *self._candidate_args(model),
            )
        except RedisUnavailable:
            return  # the lease expires on its own
        self._note_cost(model, cost)
        if self.limits.user_inflight is not None or self.limits.key_inflight is not None:
            # The person (or key) may now be under a cap that held their requests for other models.
            await self._refresh(None)

    async def _refresh(self, models: list[str] | None) -> None:
        try:
            if models is None:
                queued = await self._link.call(self._link.client.zrange(f"{self._prefix}queued", 0, -1))
                models = [_text(model) for model in queued]
            for model in models:
                await self._call(self._dispatch, model, *self._candidate_args(model))
        except RedisUnavailable:
            self._degrade()

    async def _call(self, script: Any, *args: object) -> Any:
        arguments = [self._prefix, self._rng.randrange(2**31), self._lease_ms, *args]
        return await self._link.call(script(keys=[], args=arguments))

    def _note_cost(self, model: str, value: Any) -> None:
        if model:
            self._costs[model] = float(_text(value))
            if len(self._costs) > queue_scripts.MAX_MODELS_COSTED:
                self._costs.pop(next(iter(self._costs)))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- renewal and the subscription ----------------------------------------------------------------------

    async def _renew_forever(self) -> None:
        """Every third of the lease: the heartbeat, and everything this replica holds renewed. Then the
        models its requests wait for are dispatched: a slot freed by an expiry (a replica gone), not by a
        release, has nobody else to hand it on."""
        while True:
            with contextlib.suppress(RedisUnavailable):
                await self.renew()
                models = {waiter.ask.model for waiter in self._waiters.values() if waiter.queued}
                if models:
                    await self._refresh(sorted(models))
            await asyncio.sleep(self.lease_seconds / 3)

    async def renew(self) -> None:
        """Renew what this replica holds, in one round trip, and learn from the answer: grants whose message
        was lost, waiters Redis lost (they queue again), grants lost (logged, and counted there again), the
        live replicas. Local grants are counted in Redis first."""
        try:
            await self._adopt_locals()
            waiters = [holder for holder, waiter in self._waiters.items() if waiter.queued]
            adopted = {entry.holder: entry for entry in self._locals if entry.adopted}
            grants = [*self._grants, *adopted]
            replicas, states = await self._call(self._renew, self.replica, *waiters, *grants)
        except RedisUnavailable:
            self._degrade()
            raise
        self._replicas_seen = max(1, int(replicas))
        self._recover()
        lost: list[SharedGrant] = []
        again: list[tuple[str, Grant]] = []
        for holder, state in zip([*waiters, *grants], states, strict=True):
            status = _text(state[0])
            waiter = self._waiters.get(holder)
            if waiter is not None and waiter.queued:
                if status == "granted":
                    self._deliver(holder, state[1:5])
                elif status == "gone" and not waiter.future.done():
                    self._waiters.pop(holder, None)
                    waiter.future.set_exception(_Requeue())
            elif status == "gone" and holder in self._grants:
                lost.append(self._grants[holder])
                again.append((holder, self._grants[holder]))
            elif status == "gone" and holder in adopted:
                again.append((holder, adopted[holder].grant))
        if lost:
            logger.warning(
                "%d shared slot(s) expired in Redis before they were renewed (first: %s on %s); counted "
                "there again, as they still run",
                len(lost),
                lost[0].model,
                lost[0].host,
            )
        if again:
            # Still running on their hosts: the shared queue must count them, or it hands their slots out.
            try:
                await self._call(self._adopt, *_adopt_args(again))
            except RedisUnavailable:
                self._degrade()
                raise

    async def _listen(self) -> None:
        """This replica's channel, subscribed again whenever the connection breaks; after each subscription,
        a renewal reads the grants made meanwhile."""
        while True:
            pubsub = self._link.client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                self._subscribed.set()
                with contextlib.suppress(RedisUnavailable):
                    await self.renew()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=LISTEN_SECONDS)
                    if message is not None and message.get("type") == "message":
                        holder, *fields = _text(message["data"]).split("\n")
                        self._deliver(holder, list(fields))
            except (RedisError, OSError, TimeoutError):
                self._subscribed.clear()
                await self._link.check()
                self._degrade()  # if the link says Redis is gone
                await asyncio.sleep(RESUBSCRIBE_PAUSE)
            finally:
                self._subscribed.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()

    # -- degraded mode ---------------------------------------------------------------------------------------

    def _shared_usable(self) -> bool:
        if self._link.up:
            self._recover()
            return True
        self._degrade()
        return False

    def _degrade(self) -> None:
        """Redis does not answer: said once; the requests waiting there move to the local queue."""
        if self._degraded or self._link.up:
            return
        self._degraded = True
        self._shared_back.clear()
        logger.warning(
            "the shared fair queue is out of reach (Redis at %s does not answer): this replica admits "
            "requests with its share of each host's slots (divided by %d replica%s last seen) until it "
            "answers again",
            self._link.name,
            self._replicas_seen,
            "" if self._replicas_seen == 1 else "s",
        )
        for holder, waiter in list(self._waiters.items()):
            if not waiter.future.done():
                self._waiters.pop(holder, None)
                waiter.future.set_exception(_MovedLocal())

    def _recover(self) -> None:
        if self._degraded:
            self._degraded = False
            self._shared_back.set()
            logger.warning("the shared fair queue is back (Redis at %s answers)", self._link.name)

    async def _acquire_locally(self, ask: Ask, since: float, deadline: float) -> Grant:
        """A slot from this replica's share, unless Redis answers again first: the request then joins the
        shared queue (`_BackToShared`), keeping what is left of its wait, rather than take a slot the other
        replicas, back on the shared queue, cannot see."""
        acquiring = asyncio.ensure_future(self._fallback.acquire(ask))
        back = asyncio.ensure_future(self._shared_back.wait())
        try:
            await asyncio.wait(
                {acquiring, back}, timeout=max(deadline - self._clock(), 0.0), return_when=FIRST_COMPLETED
            )
        finally:
            back.cancel()
            if not acquiring.done():
                acquiring.cancel()  # a slot granted in that instant is given back
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({acquiring})
        if acquiring.cancelled():
            if self._shared_back.is_set():
                raise _BackToShared
            timeout = self.limits.timeout(ask.band)
            message = f"no slot for this model came free within {timeout:g} s"
            raise Refused(503, message, _retry_after(self.cost_of(ask.model)))
        grant = acquiring.result()  # or its Refused
        grant.waited = self._clock() - since
        self._locals.append(_Local(f"{self.replica}:{next(self._ids)}", grant))
        self._metrics.admissions.inc()
        return grant

    def _release_local(self, grant: Grant, slot_seconds: float | None) -> None:
        used = slot_seconds if slot_seconds is not None else max(self._clock() - grant.started, 0.0)
        self._fallback.release(grant, slot_seconds)
        entry = next((entry for entry in self._locals if entry.grant is grant), None)
        if entry is None:
            return
        self._locals.remove(entry)
        if entry.adopted:
            self._spawn(self._give_back(entry.holder, grant.model, used, slot_seconds))

    async def _adopt_locals(self) -> None:
        """Count in Redis the local grants still running that it does not count yet (RedisUnavailable if
        it does not answer): from then on the shared queue offers only the slots they leave."""
        entries = [entry for entry in self._locals if not entry.adopted]
        if not entries:
            return
        await self._call(self._adopt, *_adopt_args([(entry.holder, entry.grant) for entry in entries]))
        for entry in entries:
            entry.adopted = True
            if entry not in self._locals:  # released meanwhile: its release found nothing to give back
                self._spawn(self._give_back(entry.holder, entry.grant.model, 0.0, None))

    def _local_candidates(self, model: str) -> list[Candidate]:
        """The hosts for the local queue: each host's slots divided by the replicas last seen (at least
        one), less the shared grants this replica still runs there."""
        shares = []
        for candidate in self._candidates(model):
            if candidate.slots is not None:
                share = max(1, candidate.slots // self._replicas_seen)
                share -= self._own.get((candidate.host, model), 0)
                candidate = replace(candidate, slots=max(share, 0))
            shares.append(candidate)
        return shares

    @property
    def degraded(self) -> bool:
        return self._degraded


def _adopt_args(grants: list[tuple[str, Grant]]) -> list[object]:
    args: list[object] = []
    for holder, grant in grants:
        ask = grant.ask
        key = "" if ask.key is None else quote(ask.key, safe="")
        user = quote(ask.user, safe="")
        args += [holder, grant.host, quote(grant.host, safe=""), grant.model, int(ask.band), user, key]
    return args


def _granted(future: asyncio.Future[Grant]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _cap(value: int | None) -> int:
    return -1 if value is None else value


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _retry_after(cost: float) -> int:
    return max(1, round(cost))


__all__ = ["SharedGrant", "SharedScheduler"]
