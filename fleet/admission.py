"""The fleet: the hosts, the fair queue in front of them, and what each finished request teaches about both.

`admit` is the one admission point every surface's model call goes through (a slot on a host, or a wait
for one); `finish` gives the slot back on every path, with what Ollama's counters said. A host that failed the
request is ejected (fleet.health) before its slot is handed on, so the next waiter goes elsewhere; slots
unknown for a (host, model) are learned from the counters (fleet.learning).

With REDIS_URL set, the fair queue and the slots are shared by every replica (fleet.shared_scheduler), and
so are the hosts' health and learned slots (fleet.shared_hosts); without it, they are this process's own
(fleet.scheduler), as they always were.

Hosts change while it runs (`put`, `remove`): through `/admin/hosts` (fleet.changes), and from the stored
hosts, read again at every periodic check, so that a change `manage.py` or another replica made is taken
up within HOST_CHECK_SECONDS (fleet.store).
"""

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from cluster.redis_link import RedisLink
from core.storage_errors import StorageError
from fleet.hosts import STORED, Host, HostConfig, Hosts, shown_model
from fleet.learning import SlotLearner
from fleet.scheduler import Ask, Grant, Limits, Refused, Scheduler
from fleet.shared_hosts import SharedHosts
from fleet.shared_scheduler import SharedScheduler
from upstream.counters import Counters

logger = logging.getLogger("gateway.fleet")


@dataclass(frozen=True)
class SharedQueue:
    """Where the replicas share the fair queue: REDIS_URL's link, REDIS_PREFIX, LEASE_SECONDS."""

    link: RedisLink
    prefix: str
    lease_seconds: float


@dataclass(frozen=True)
class Ended:
    """How a request that held a slot ended."""

    counters: Counters | None = None
    # Why the host failed it (no connection, a fast 5xx): the host is ejected for a while.
    host_failed: str | None = None
    # The host answered as a working Ollama does (any answer but a 5xx): an ejected host is back. A slow
    # 5xx is neither: a model that failed on this request says nothing of the host.
    host_answered: bool = True


class Fleet:
    def __init__(
        self,
        hosts: Hosts,
        limits: Limits,
        check_seconds: float,
        read_stored: Callable[[], Awaitable[list[HostConfig]]] | None = None,
        shared: SharedQueue | None = None,
    ) -> None:
        self.hosts = hosts
        self.scheduler: Scheduler | SharedScheduler
        # With REDIS_URL: what the replicas decide of the hosts (health, learned slots), decided together.
        self.shared_hosts: SharedHosts | None = None
        if shared is None:
            self.scheduler = Scheduler(hosts.candidates, limits)
        else:
            self.scheduler = SharedScheduler(
                hosts.candidates, shared.link, shared.prefix, shared.lease_seconds, limits
            )
            self.shared_hosts = SharedHosts(
                hosts,
                shared.link,
                shared.prefix,
                learn_alone=self._learn_alone,
                on_change=self.scheduler.refresh,
            )
            hosts.on_check = self._checked
        self._check_seconds = check_seconds
        self._checks: asyncio.Task[None] | None = None
        self._read_stored = read_stored
        # Bumped by every change of the hosts: a read of the stored hosts begun before one may be older.
        self._generation = 0
        self._checking: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        """Check every host now and then every `check_seconds`, in the background."""
        self._checks = asyncio.get_running_loop().create_task(self._check_forever())
        if isinstance(self.scheduler, SharedScheduler):
            self.scheduler.start()
        if self.shared_hosts is not None:
            self.shared_hosts.start()

    async def close(self) -> None:
        self.scheduler.close()
        if isinstance(self.scheduler, SharedScheduler):
            await self.scheduler.aclose()
        if self.shared_hosts is not None:
            await self.shared_hosts.aclose()
        for task in [self._checks, *self._checking]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.hosts.close()

    async def check_now(self) -> None:
        """Take up the stored hosts' changes, then ask every enabled host its models."""
        await self.read_stored()
        await self.hosts.check_all()
        if self.shared_hosts is not None:
            await self.shared_hosts.sync()  # a message lost, a learned value expired
        self.scheduler.refresh()

    async def _check_forever(self) -> None:
        while True:
            await self.check_now()
            await asyncio.sleep(self._check_seconds)

    # -- hosts changing while it runs ------------------------------------------------------------------------

    async def read_stored(self) -> None:
        """Make the stored hosts here what the database says (a change by `manage.py`, another replica)."""
        if self._read_stored is None:
            return
        generation = self._generation
        try:
            configs = await self._read_stored()
        except (SQLAlchemyError, StorageError) as exc:
            logger.warning("could not read the stored Ollama hosts (the known ones are kept): %s", exc)
            return
        if generation == self._generation:  # else a change made here meanwhile is newer than what was read
            self.sync_stored(configs)

    def sync_stored(self, configs: list[HostConfig]) -> None:
        wanted = {config.id: config for config in configs}
        for host in self.hosts:
            if host.config.source == STORED and host.id not in wanted:
                self.remove(host.id)
        for config in configs:
            known = self.hosts.by_id.get(config.id)
            if known is None or known.config != config:
                self.put(config)

    def put(self, config: HostConfig) -> Host:
        """Add a host, or make a known one `config`, at once. A host new, at a new URL or enabled again is
        checked straight away (its models); requests waiting are dispatched to whatever slots appeared."""
        self._generation += 1
        known = self.hosts.by_id.get(config.id)
        if known is None or known.config.url != config.url:
            host = self.hosts.add(config)
            check = True
            logger.info("Ollama host %s (%s) %s", host.name, host.id, "added" if known is None else "moved")
        else:
            host = known
            check = not known.config.enabled
            if config.slots != known.config.slots:
                host.learners.clear()  # slots set again, or to be learned afresh
            host.config = config
        if check and config.enabled:
            task = asyncio.get_running_loop().create_task(self._check(host))
            self._checking.add(task)
            task.add_done_callback(self._checking.discard)
        self.scheduler.refresh()
        return host

    def remove(self, host_id: str) -> bool:
        """Take a host out: no new work goes to it; what runs there finishes (Hosts.remove)."""
        self._generation += 1
        removed = self.hosts.remove(host_id)
        if removed is not None:
            logger.info("Ollama host %s (%s) removed", removed.name, removed.id)
        return removed is not None

    async def _check(self, host: Host) -> None:
        await self.hosts.check(host)
        self.scheduler.refresh()

    async def admit(self, ask: Ask) -> Grant:
        """A slot for the request (Refused: 429 or 503, with Retry-After)."""
        if not any(host.takes_work() for host in self.hosts):
            raise Refused(503, "no Ollama host takes requests now (all disabled or draining)", retry_after=30)
        if self.shared_hosts is not None:
            self.shared_hosts.start()  # as the shared queue starts: at the first request, if not before
        return await self.scheduler.acquire(ask)

    def host(self, grant: Grant) -> Host | None:
        return self.hosts.by_id.get(grant.host)

    def can_retry_elsewhere(self, grant: Grant) -> bool:
        """Whether another host could take this request (after the one it went to failed it)."""
        tried = grant.ask.avoid | {grant.host}
        return any(candidate.host not in tried for candidate in self.hosts.candidates(grant.model))

    def finish(self, grant: Grant, ended: Ended) -> bool:
        """Give the slot back, once, whatever happened; learn from how it went. True when this request
        loaded its model on the host: the first answer from a model the host was not known to hold loaded
        (the periodic check forgets a model the host unloaded)."""
        if grant.released:
            return False
        host = self.host(grant)
        counters = ended.counters
        more_slots = loaded_model = False
        if host is not None:
            more_slots = self._judge(host, grant, ended)
            if counters is not None:
                if grant.model not in host.loaded:  # most answers come from a model known loaded
                    host.loaded = host.loaded | {grant.model}
                    loaded_model = True
                more_slots = self._learn(host, grant, counters) or more_slots
        self.scheduler.release(grant, counters.slot_seconds if counters is not None else None)
        if more_slots:
            # A host back in service, or slots now known, may serve requests waiting for any model.
            self.scheduler.refresh()
        return loaded_model

    def _judge(self, host: Host, grant: Grant, ended: Ended) -> bool:
        """Ejects a host that failed; True when one comes back into service: only by a request sent to it
        on trial (a request sent before it failed says nothing of it since)."""
        health = host.health
        shared = self.shared_hosts
        if ended.host_failed is not None:
            newly = health.healthy
            health.failed(time.monotonic(), ended.host_failed)
            if shared is not None:
                shared.failed(host, ended.host_failed, newly)  # and says it, once for every replica
            elif newly:
                logger.warning("Ollama host %s is out of service: %s", host.name, ended.host_failed)
            return False
        if health.healthy or not ended.host_answered or not health.is_trial(grant.started):
            return False
        health.succeeded()
        if shared is not None:
            shared.succeeded(host, time.monotonic() - grant.started)
        else:
            logger.warning("Ollama host %s is back in service", host.name)
        return True

    def _checked(self, host: Host, problem: str | None, newly: bool) -> None:
        """A periodic check's news (Hosts.on_check), with REDIS_URL: for every replica."""
        if self.shared_hosts is None:
            return
        if problem is not None:
            self.shared_hosts.failed(host, problem, newly)
        else:
            self.shared_hosts.answered(host)

    def _learn(self, host: Host, grant: Grant, counters: Counters) -> bool:
        """True when this request settled the slots of its (host, model). Only answers that say how long the
        model worked (prompt evaluation and generation: chat, generate) tell a wait from work; an embedding's
        answer does not."""
        if counters.prompt_eval_duration is None or counters.eval_duration is None:
            return False
        if self.shared_hosts is not None:
            # Learned in Redis from every replica's requests; the scheduler hears of it when it settles.
            self.shared_hosts.observe(host, grant.model, grant.running, counters.waited_seconds)
            return False
        return self._learn_alone(host, grant.model, grant.running, counters.waited_seconds)

    def _learn_alone(self, host: Host, model: str, running: int, waited: float | None) -> bool:
        """fleet.learning in this process: True when the observation settled the (host, model)'s slots."""
        learner = host.learners.setdefault(model, SlotLearner())
        learned = learner.observe(running, waited)
        if learned is None:
            return False
        logger.warning(
            "learned from Ollama's timings: host %s runs %d request%s at once for %s; the gateway now "
            "holds the rest in its queue (until it restarts, or the host's slots are set again)",
            host.name,
            learned,
            "" if learned == 1 else "s",
            shown_model(model),
        )
        return True

    def snapshot(self) -> list[dict[str, Any]]:
        """What `/admin/hosts` shows of each host (never its credentials)."""
        return [self.describe(host) for host in self.hosts]

    def describe(self, host: Host) -> dict[str, Any]:
        """What `/admin/hosts` shows of one host: per model it holds loaded or runs, its slots (`capacity`,
        and whether `configured` or `learned`), the requests in flight there and those waiting for it."""
        inflight = self.scheduler.inflight_by_slot()
        waiting = self.scheduler.waiting_models()
        models = sorted({model for (hid, model) in inflight if hid == host.id} | set(host.loaded))
        return {
            "id": host.id,
            "name": host.name,
            "url": host.upstream.public_url,
            "source": host.config.source,
            "enabled": host.config.enabled,
            "draining": host.config.draining,
            "slots": host.config.slots,
            "healthy": host.health.healthy,
            "problem": host.health.problem,
            "models": sorted(map(shown_model, host.models)) if host.models is not None else None,
            "loaded": sorted(map(shown_model, host.loaded)),
            "capacity": {
                shown_model(model): {
                    "capacity": host.slots_for(model),
                    "source": host.slots_source(model),
                    "inflight": inflight.get((host.id, model), 0),
                    "waiting": waiting.get(model, 0),
                }
                for model in models
            },
        }


__all__ = ["Ask", "Ended", "Fleet", "Grant", "Limits", "Refused", "SharedQueue"]
