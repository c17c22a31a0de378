"""The fleet: the hosts, the fair queue in front of them, and what each finished request teaches about both.

`admit` is the one admission point every surface's model call goes through (a slot on a host, or a wait
for one); `finish` gives the slot back on every path, with what Ollama's counters said. A host that failed the
request is ejected (fleet.health) before its slot is handed on, so the next waiter goes elsewhere; slots
unknown for a (host, model) are learned from the counters (fleet.learning).
"""

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from fleet.hosts import Host, Hosts, shown_model
from fleet.learning import SlotLearner
from fleet.scheduler import Ask, Grant, Limits, Refused, Scheduler
from upstream.counters import Counters

logger = logging.getLogger("gateway.fleet")


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
    def __init__(self, hosts: Hosts, limits: Limits, check_seconds: float) -> None:
        self.hosts = hosts
        self.scheduler = Scheduler(hosts.candidates, limits)
        self._check_seconds = check_seconds
        self._checks: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Check every host now and then every `check_seconds`, in the background."""
        self._checks = asyncio.get_running_loop().create_task(self._check_forever())

    async def close(self) -> None:
        self.scheduler.close()
        if self._checks is not None:
            self._checks.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checks
        await self.hosts.close()

    async def check_now(self) -> None:
        await self.hosts.check_all()
        self.scheduler.refresh()

    async def _check_forever(self) -> None:
        while True:
            await self.check_now()
            await asyncio.sleep(self._check_seconds)

    async def admit(self, ask: Ask) -> Grant:
        """A slot for the request (Refused: 429 or 503, with Retry-After)."""
        if not any(host.takes_work() for host in self.hosts):
            raise Refused(503, "no Ollama host takes requests now (all disabled or draining)", retry_after=30)
        return await self.scheduler.acquire(ask)

    def host(self, grant: Grant) -> Host | None:
        return self.hosts.by_id.get(grant.host)

    def can_retry_elsewhere(self, grant: Grant) -> bool:
        """Whether another host could take this request (after the one it went to failed it)."""
        tried = grant.ask.avoid | {grant.host}
        return any(candidate.host not in tried for candidate in self.hosts.candidates(grant.model))

    def finish(self, grant: Grant, ended: Ended) -> None:
        """Give the slot back, once, whatever happened; learn from how it went."""
        if grant.released:
            return
        host = self.host(grant)
        counters = ended.counters
        more_slots = False
        if host is not None:
            more_slots = self._judge(host, grant, ended)
            if counters is not None:
                host.loaded = host.loaded | {grant.model}
                more_slots = self._learn(host, grant, counters) or more_slots
        self.scheduler.release(grant, counters.slot_seconds if counters is not None else None)
        if more_slots:
            # A host back in service, or slots now known, may serve requests waiting for any model.
            self.scheduler.refresh()

    def _judge(self, host: Host, grant: Grant, ended: Ended) -> bool:
        """Ejects a host that failed; True when one comes back into service: only by a request sent to it
        on trial (a request sent before it failed says nothing of it since)."""
        health = host.health
        if ended.host_failed is not None:
            if health.healthy:
                logger.warning("Ollama host %s is out of service: %s", host.name, ended.host_failed)
            health.failed(time.monotonic(), ended.host_failed)
            return False
        if health.healthy or not ended.host_answered or not health.is_trial(grant.started):
            return False
        logger.warning("Ollama host %s is back in service", host.name)
        health.succeeded()
        return True

    def _learn(self, host: Host, grant: Grant, counters: Counters) -> bool:
        """True when this request settled the slots of its (host, model). Only answers that say how long the
        model worked (prompt evaluation and generation: chat, generate) tell a wait from work; an embedding's
        answer does not."""
        if counters.prompt_eval_duration is None or counters.eval_duration is None:
            return False
        learner = host.learners.setdefault(grant.model, SlotLearner())
        learned = learner.observe(grant.running, counters.waited_seconds)
        if learned is None:
            return False
        logger.warning(
            "learned from Ollama's timings: host %s runs %d request%s at once for %s; the gateway now "
            "holds the rest in its queue (until it restarts, or the host's slots are set again)",
            host.name,
            learned,
            "" if learned == 1 else "s",
            shown_model(grant.model),
        )
        return True

    def snapshot(self) -> list[dict[str, Any]]:
        """What `/admin/hosts` shows of each host (never its credentials)."""
        inflight = self.scheduler.inflight_by_slot()
        waiting = self.scheduler.waiting_models()
        shown = []
        for host in self.hosts:
            models = sorted({model for (hid, model) in inflight if hid == host.id} | set(host.loaded))
            shown.append(
                {
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
            )
        return shown


__all__ = ["Ask", "Ended", "Fleet", "Grant", "Limits", "Refused"]
