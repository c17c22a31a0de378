"""The admission point: every request that runs a model gets a slot on a host here, or waits here for one.

Ollama's own queue is first-come-first-served and, for a loaded model, unbounded (notes: ollama-scheduling):
a person who sends 50 requests at once makes everyone behind them wait. So the gateway never sends a
(host, model) more requests than its slots, and holds the rest here, where it can choose who goes next:
- bands first: every waiting interactive request goes before any batch one;
- inside a band, people by the slot-time they have received: the waiting person with the least goes next
  (start-time fair queueing over people, costed in slot-seconds). Each dispatch charges an estimate (the
  model's recent average); when the request ends, Ollama's real durations correct it. A person who starts
  waiting again begins at the band's current virtual time, so time spent idle is not saved up for a burst;
- one person's requests keep their order.
Dispatch is work-conserving and immediate: `release` hands the freed slot to the next waiter in the same
call, and `refresh` does so for slots that appeared elsewhere (a host back, slots learned or raised).

A (host, model) whose slots are unknown takes every request at once, as before this queue existed; its
in-flight count is still kept (shown, and used to prefer the least loaded host).

The scheduler only counts and orders. Which hosts may serve a model, and how many slots each has, it asks
of `candidates` (fleet.hosts); talking to Ollama is the relay's.
"""

import asyncio
import itertools
import random
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import IntEnum


class Band(IntEnum):
    """Lower goes first."""

    INTERACTIVE = 0
    BATCH = 1

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class Candidate:
    """A host that can serve a model: healthy, enabled, and holding the model."""

    host: str
    loaded: bool
    # Requests it runs at once for this model; None: not known, so not limited.
    slots: int | None
    # Back from ejection on trial: it takes one request at a time, whatever the model (fleet.health).
    trial: bool = False


@dataclass(frozen=True)
class Limits:
    """Per person and per API key; None: no limit. A person's own caps, where an admin set them, come with
    each of their requests (`Ask`) and stand in for the first two."""

    user_inflight: int | None = None
    user_waiting: int | None = 64
    key_inflight: int | None = None
    key_waiting: int | None = None
    # Seconds a request may wait for a slot, by band.
    interactive_timeout: float = 120.0
    batch_timeout: float = 1800.0

    def timeout(self, band: Band) -> float:
        return self.interactive_timeout if band is Band.INTERACTIVE else self.batch_timeout


class Refused(Exception):
    """Not admitted. `status` is 429 (a cap: too many waiting) or 503 (waited too long, shutting down)."""

    def __init__(self, status: int, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


@dataclass(frozen=True)
class Ask:
    """What a request asks for: a slot for `model`, counted against `user` (and `key`), in `band`."""

    user: str
    model: str
    band: Band = Band.INTERACTIVE
    key: str | None = None
    # Hosts not to use (one that just failed this request).
    avoid: frozenset[str] = frozenset()
    # The person's own caps on requests in flight and waiting, as their record says (read with their
    # credentials, so no lookup here): None, the Limits'; 0, no limit.
    user_inflight: int | None = None
    user_waiting: int | None = None


@dataclass(eq=False)
class Grant:
    """A slot held on `host` for `model`; give it back with `Scheduler.release`, once, on every path."""

    host: str
    model: str
    ask: Ask
    charged: float  # the slot-seconds charged at dispatch
    waited: float  # seconds spent waiting here
    started: float  # clock time when granted
    running: int = 1  # requests in flight to this (host, model) once granted, this one included
    released: bool = False


@dataclass(eq=False)
class _Waiter:
    ask: Ask
    future: asyncio.Future[Grant]
    since: float
    order: int


DEFAULT_COST = 1.0  # slot-seconds charged for a model not yet measured
COST_SMOOTHING = 0.2  # weight of the newest request in a model's running average
MAX_MODELS_COSTED = 1024


class Scheduler:
    def __init__(
        self,
        candidates: Callable[[str], Iterable[Candidate]],
        limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self._candidates = candidates
        self.limits = limits or Limits()
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 (breaking ties between hosts, not a secret)
        self._inflight: dict[tuple[str, str], int] = {}
        self._host_inflight: dict[str, int] = {}
        self._user_inflight: dict[str, int] = {}
        self._key_inflight: dict[str, int] = {}
        self._user_waiting: dict[str, int] = {}
        self._key_waiting: dict[str, int] = {}
        # model -> band -> person -> their requests waiting, in order; emptied entries are dropped.
        self._queues: dict[str, dict[Band, dict[str, deque[_Waiter]]]] = {}
        # Fair shares are of one model's slots, the ones people compete for: model -> (band, person) -> the
        # slot-time they have received there, in that queue's virtual time; (model, band) -> its clock (the
        # start tag of the last request it dispatched). Once nothing waits or runs for a model, nobody
        # competes there: its history is dropped (virtual time starts again, as in fair queueing when the
        # system goes idle), so names asked once are not kept.
        self._vtime: dict[str, dict[tuple[Band, str], float]] = {}
        self._clock_of: dict[tuple[str, Band], float] = {}
        self._model_inflight: dict[str, int] = {}
        # Recent slot-seconds per model, from completed answers only (a name nobody runs is never kept).
        self._cost: dict[str, float] = {}
        self._order = itertools.count()
        self._closed = False

    # -- asking and giving back ------------------------------------------------------------------------------

    def try_acquire(self, ask: Ask) -> Grant | None:
        """A slot for `ask` if one is free for it right now and nobody waits for the model; else None (then
        `acquire`). The common case, without a future or a task."""
        if self._closed or ask.model in self._queues or not self._within_inflight_caps(ask):
            return None
        host = self._pick_host(ask)
        return None if host is None else self._grant(ask, host, since=self._clock())

    async def acquire(self, ask: Ask) -> Grant:
        """A slot for `ask`: at once if one is free for it, else when its turn comes.

        Raises Refused. Cancelled while waiting (the client went away), the request leaves the queue at once;
        a slot granted in that same instant is given back."""
        if self._closed:
            raise Refused(503, "the gateway is shutting down", retry_after=1)
        waiter = _Waiter(ask, asyncio.get_running_loop().create_future(), self._clock(), next(self._order))
        self._enqueue(waiter)
        self._dispatch(ask.model)
        if waiter.future.done():
            return waiter.future.result()
        try:
            self._check_waiting_caps(ask)
        except Refused:
            self._remove(waiter)
            raise
        timeout = self.limits.timeout(ask.band)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            if _granted(waiter.future):  # in the very instant the time ran out
                return waiter.future.result()
            self._remove(waiter)
            message = f"no slot for this model came free within {timeout:g} s"
            raise Refused(503, message, _retry_after(self.cost_of(ask.model))) from None
        except asyncio.CancelledError:
            if _granted(waiter.future):
                self.release(waiter.future.result(), slot_seconds=0.0)
            else:
                self._remove(waiter)
            raise

    def release(self, grant: Grant, slot_seconds: float | None = None) -> None:
        """Give the slot back. `slot_seconds`: what the request really used (Ollama's prompt evaluation and
        generation), which corrects the person's charge; None: the time the slot was held."""
        if grant.released:
            return
        grant.released = True
        used = slot_seconds if slot_seconds is not None else max(self._clock() - grant.started, 0.0)
        ask = grant.ask
        _decrement(self._inflight, (grant.host, grant.model))
        _decrement(self._host_inflight, grant.host)
        _decrement(self._model_inflight, grant.model)
        _decrement(self._user_inflight, ask.user)
        if ask.key is not None:
            _decrement(self._key_inflight, ask.key)
        times = self._vtime.setdefault(grant.model, {})
        clock = self._clock_of.get((grant.model, ask.band), 0.0)
        times[(ask.band, ask.user)] = times.get((ask.band, ask.user), clock) + used - grant.charged
        if slot_seconds is not None:
            self._learn_cost(grant.model, slot_seconds)
        self._dispatch(grant.model)
        if grant.model not in self._queues and not self._model_inflight.get(grant.model):
            self._vtime.pop(grant.model, None)
            for band in Band:
                self._clock_of.pop((grant.model, band), None)
        if self.limits.user_inflight is not None or self.limits.key_inflight is not None:
            # The person (or key) may now be under a cap that held their requests for other models.
            self.refresh()

    def refresh(self, models: Iterable[str] | None = None) -> None:
        """Slots may have appeared (a host back, added or raised; slots learned): dispatch who can go."""
        for model in list(self._queues if models is None else models):
            self._dispatch(model)

    def close(self) -> None:
        """Refuse every waiter (503) and every new request: the gateway is stopping."""
        self._closed = True
        for model in list(self._queues):
            for people in self._queues.pop(model).values():
                for waiting in people.values():
                    for waiter in waiting:
                        self._forget_waiting(waiter.ask)
                        if not waiter.future.done():
                            waiter.future.set_exception(Refused(503, "the gateway is shutting down", 1))

    # -- what it shows -------------------------------------------------------------------------------------

    def inflight(self, host: str, model: str) -> int:
        return self._inflight.get((host, model), 0)

    def inflight_by_slot(self) -> dict[tuple[str, str], int]:
        return {slot: count for slot, count in self._inflight.items() if count}

    def waiting(self, model: str | None = None) -> dict[str, int]:
        """Requests waiting, by band label (for one model, or all)."""
        counts = dict.fromkeys((band.label for band in Band), 0)
        for name, bands in self._queues.items():
            if model is None or name == model:
                for band, people in bands.items():
                    counts[band.label] += sum(len(waiting) for waiting in people.values())
        return counts

    def waiting_models(self) -> dict[str, int]:
        """Requests waiting, by model, every band together."""
        return {
            model: sum(len(waiting) for people in bands.values() for waiting in people.values())
            for model, bands in self._queues.items()
        }

    def cost_of(self, model: str) -> float:
        """The slot-seconds a request for `model` usually takes (its running average)."""
        return self._cost.get(model, DEFAULT_COST)

    # -- inside ----------------------------------------------------------------------------------------------

    def _within_inflight_caps(self, ask: Ask) -> bool:
        limits = self.limits
        cap = limits.user_inflight if ask.user_inflight is None else ask.user_inflight or None
        if cap is not None and self._user_inflight.get(ask.user, 0) >= cap:
            return False
        if ask.key is not None and limits.key_inflight is not None:
            return self._key_inflight.get(ask.key, 0) < limits.key_inflight
        return True

    def _check_waiting_caps(self, ask: Ask) -> None:
        """Called for a request just queued (so counted): over a cap, it may not wait."""
        limits = self.limits
        retry = _retry_after(self.cost_of(ask.model))
        cap = limits.user_waiting if ask.user_waiting is None else ask.user_waiting or None
        if cap is not None and self._user_waiting.get(ask.user, 0) > cap:
            raise Refused(429, f"you already have {cap} requests waiting", retry)
        if (
            ask.key is not None
            and limits.key_waiting is not None
            and self._key_waiting.get(ask.key, 0) > limits.key_waiting
        ):
            raise Refused(429, f"this API key already has {limits.key_waiting} requests waiting", retry)

    def _pick_host(self, ask: Ask) -> str | None:
        """The best host with a free slot for the model: loaded there first, then one that can load it, then
        the least loaded; ties broken at random. None: every slot is taken."""
        best: list[str] = []
        best_rank: tuple[int, float] | None = None
        for candidate in self._candidates(ask.model):
            if candidate.host in ask.avoid:
                continue
            inflight = self._inflight.get((candidate.host, ask.model), 0)
            if candidate.slots is not None and inflight >= candidate.slots:
                continue
            if candidate.trial and self._host_inflight.get(candidate.host, 0):
                continue
            load = inflight / candidate.slots if candidate.slots else float(inflight)
            rank = (0 if candidate.loaded else 1, load)
            if best_rank is None or rank < best_rank:
                best, best_rank = [candidate.host], rank
            elif rank == best_rank:
                best.append(candidate.host)
        if not best:
            return None
        return best[0] if len(best) == 1 else self._rng.choice(best)

    def _grant(self, ask: Ask, host: str, since: float) -> Grant:
        now = self._clock()
        slot = (host, ask.model)
        self._inflight[slot] = self._inflight.get(slot, 0) + 1
        self._host_inflight[host] = self._host_inflight.get(host, 0) + 1
        self._model_inflight[ask.model] = self._model_inflight.get(ask.model, 0) + 1
        self._user_inflight[ask.user] = self._user_inflight.get(ask.user, 0) + 1
        if ask.key is not None:
            self._key_inflight[ask.key] = self._key_inflight.get(ask.key, 0) + 1
        times = self._vtime.setdefault(ask.model, {})
        # Idle time is not saved up: a person's virtual time is at least the queue's clock.
        clock = self._clock_of.get((ask.model, ask.band), 0.0)
        start = max(times.get((ask.band, ask.user), clock), clock)
        self._clock_of[(ask.model, ask.band)] = start
        charged = self.cost_of(ask.model)
        times[(ask.band, ask.user)] = start + charged
        waited = now - since
        return Grant(host, ask.model, ask, charged, waited, started=now, running=self._inflight[slot])

    def _enqueue(self, waiter: _Waiter) -> None:
        ask = waiter.ask
        people = self._queues.setdefault(ask.model, {}).setdefault(ask.band, {})
        if ask.user not in people:
            # Starting to wait again: time spent idle is not saved up for a burst.
            times = self._vtime.setdefault(ask.model, {})
            clock = self._clock_of.get((ask.model, ask.band), 0.0)
            times[(ask.band, ask.user)] = max(times.get((ask.band, ask.user), clock), clock)
        people.setdefault(ask.user, deque()).append(waiter)
        self._user_waiting[ask.user] = self._user_waiting.get(ask.user, 0) + 1
        if ask.key is not None:
            self._key_waiting[ask.key] = self._key_waiting.get(ask.key, 0) + 1

    def _forget_waiting(self, ask: Ask) -> None:
        _decrement(self._user_waiting, ask.user)
        if ask.key is not None:
            _decrement(self._key_waiting, ask.key)

    def _remove(self, waiter: _Waiter) -> None:
        ask = waiter.ask
        bands = self._queues.get(ask.model, {})
        waiting = bands.get(ask.band, {}).get(ask.user)
        if waiting is None or waiter not in waiting:
            return
        waiting.remove(waiter)
        self._forget_waiting(ask)
        if not waiting:
            del bands[ask.band][ask.user]
            if not bands[ask.band]:
                del bands[ask.band]
            if not bands:
                del self._queues[ask.model]

    def _dispatch(self, model: str) -> None:
        """While the model has waiters and a slot is free for the next of them, grant it."""
        while True:
            bands = self._queues.get(model)
            if not bands:
                return
            chosen = self._next_waiter(model, bands)
            if chosen is None:
                return
            waiter, host = chosen
            self._remove(waiter)
            waiter.future.set_result(self._grant(waiter.ask, host, since=waiter.since))

    def _next_waiter(
        self, model: str, bands: dict[Band, dict[str, deque[_Waiter]]]
    ) -> tuple[_Waiter, str] | None:
        """Interactive before batch; in a band, the person with the least slot-time received (then whoever
        has waited longest), their oldest request first."""
        times = self._vtime.get(model, {})
        for band in sorted(bands):
            people = bands[band]
            clock = self._clock_of.get((model, band), 0.0)
            ranked = sorted(people, key=lambda user: (times.get((band, user), clock), people[user][0].order))
            for user in ranked:
                waiter = people[user][0]
                if not self._within_inflight_caps(waiter.ask):
                    continue
                host = self._pick_host(waiter.ask)
                if host is not None:
                    return waiter, host
                # No slot for this person's request means none for anyone's (same model); a request that
                # avoids a host is the exception, so keep looking only past those.
                if not waiter.ask.avoid:
                    return None
        return None

    def _learn_cost(self, model: str, slot_seconds: float) -> None:
        previous = self._cost.get(model)
        if previous is None and len(self._cost) >= MAX_MODELS_COSTED:
            self._cost.pop(next(iter(self._cost)))  # the oldest entry: a bounded table, whatever is asked
        smoothed = slot_seconds if previous is None else previous + COST_SMOOTHING * (slot_seconds - previous)
        self._cost[model] = smoothed


def _granted(future: asyncio.Future[Grant]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def _decrement(counts: dict, key: object) -> None:
    left = counts.get(key, 0) - 1
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


def _retry_after(cost: float) -> int:
    """Seconds to suggest before trying again: about one request's time, at least one."""
    return max(1, round(cost))
