"""The Ollama hosts the gateway sends work to, what it knows of each, and which may serve a model now.

Hosts come from OLLAMA_URL (read at every start, shown as coming from the environment) and from the admins
(`/admin/hosts`, stored). Each has a name, its URL (credentials used, never shown), whether it is enabled,
whether it is draining (no new work; what runs finishes), and its slots: requests it runs at once per loaded
model (Ollama's OLLAMA_NUM_PARALLEL), from OLLAMA_PARALLEL or its own setting, else learned
(fleet.learning). What the gateway knows of a host (its models, the loaded ones, its health) comes from a
periodic check (`check`: /api/tags and /api/ps) and from every request's outcome (fleet.health).
"""

import asyncio
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from auth.policy import GO_WHITESPACE
from core.errors import GatewayError
from fleet.health import Health
from fleet.learning import SlotLearner
from fleet.scheduler import Candidate
from upstream.client import Upstream, UpstreamTimeouts, public_url

logger = logging.getLogger("gateway.fleet")

DEFAULT_REGISTRY = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
ENVIRONMENT = "environment"
STORED = "stored"
CHECK_TIMEOUT = 3.0


def canonical_model(name: str) -> str:
    """One key for every spelling Ollama reads as the same model, as its name parser does: host and namespace
    filled in (`registry.ollama.ai/library/`), the tag too (`:latest`), letter case folded. `llama3.2`,
    `library/llama3.2:latest` and `LLAMA3.2` share their slots and their queue."""
    name = name.strip(GO_WHITESPACE).partition("@")[0]
    *path, last = name.split("/")
    model, _, tag = last.partition(":") if ":" in last else (last, "", "latest")
    if not path:
        path = [DEFAULT_REGISTRY, DEFAULT_NAMESPACE]
    elif len(path) == 1:
        path = [DEFAULT_REGISTRY, *path]
    return f"{'/'.join(path)}/{model}:{tag}".lower()


def shown_model(key: str) -> str:
    """A model's key as people write it: without the default registry and namespace."""
    return key.removeprefix(f"{DEFAULT_REGISTRY}/{DEFAULT_NAMESPACE}/")


@dataclass
class HostConfig:
    id: str
    name: str
    url: str
    source: str = ENVIRONMENT
    enabled: bool = True
    draining: bool = False
    slots: int | None = None  # None: learn them


@dataclass
class Host:
    config: HostConfig
    upstream: Upstream
    # Known from the periodic check; None until it first answers (then any model may be asked of it).
    models: frozenset[str] | None = None
    loaded: frozenset[str] = frozenset()
    health: Health = field(default_factory=Health)
    learners: dict[str, SlotLearner] = field(default_factory=dict)
    checked_at: float | None = None

    @property
    def id(self) -> str:
        return self.config.id

    @property
    def name(self) -> str:
        return self.config.name

    def slots_for(self, model: str) -> int | None:
        """The host's slots for the model: as configured, but never more than Ollama was seen to run (it
        forces one slot on some model families, whatever OLLAMA_NUM_PARALLEL says); learned, if not set."""
        learner = self.learners.get(model)
        learned = learner.learned if learner is not None else None
        configured = self.config.slots
        if configured is None or learned is None:
            return configured if learned is None else learned
        return min(configured, learned)

    def slots_source(self, model: str) -> str | None:
        learner = self.learners.get(model)
        learned = learner.learned if learner is not None else None
        if learned is not None and (self.config.slots is None or learned < self.config.slots):
            return "learned"
        return "configured" if self.config.slots is not None else None

    def has(self, model: str) -> bool:
        return self.models is None or model in self.models

    def takes_work(self) -> bool:
        return self.config.enabled and not self.config.draining


def environment_hosts(urls: list[str], slots: int | None) -> list[HostConfig]:
    """OLLAMA_URL's hosts, named by their address (without credentials; `#2` after a name already taken);
    ids `env-1`, `env-2`, ..."""
    configs: list[HostConfig] = []
    for number, url in enumerate(urls, start=1):
        name = public_url(url).split("://", 1)[-1]
        if any(config.name == name for config in configs):
            name = f"{name}#{number}"
        configs.append(HostConfig(id=f"env-{number}", name=name, url=url, slots=slots))
    return configs


class Hosts:
    """Every host, by id, and the choice of which may serve a model now (`candidates`)."""

    def __init__(self, timeouts: UpstreamTimeouts, clock: Callable[[], float] = time.monotonic) -> None:
        self._timeouts = timeouts
        self._clock = clock
        self.by_id: dict[str, Host] = {}
        # Told of a check's failure (its problem; whether the host was in service until then) or of an
        # ejected host answering one (None, False): fleet.shared_hosts shares it with the other replicas,
        # and says it. None: said here.
        self.on_check: Callable[[Host, str | None, bool], None] | None = None

    def add(self, config: HostConfig) -> Host:
        """A new host, or a host at a new URL: what was known of the one it replaces is forgotten."""
        host = Host(config, Upstream(config.url, self._timeouts))
        replaced = self.by_id.get(config.id)
        self.by_id[config.id] = host
        if replaced is not None:
            replaced.upstream.retire()
        return host

    def remove(self, host_id: str) -> Host | None:
        """Take the host out: it gets no new work. Requests running on it finish; its connections close as
        each one ends (their slots are given back all the same: the scheduler counts by host id)."""
        host = self.by_id.pop(host_id, None)
        if host is not None:
            host.upstream.retire()
        return host

    async def close(self) -> None:
        for host in list(self.by_id.values()):
            await host.upstream.close()
        self.by_id.clear()

    def __iter__(self) -> Iterator[Host]:
        return iter(list(self.by_id.values()))

    def candidates(self, model: str) -> list[Candidate]:
        """Hosts that may take a request for `model` now: enabled, not draining, holding the model, and
        healthy (or, their back-off over, on trial: one request at a time). If every host holding it is
        ejected, those, as they are: with nothing better, each request is its own trial. If no host holds
        it, every host that takes requests: Ollama's own answer (model not found) is what the client should
        see."""
        now = self._clock()
        takers = [host for host in self.by_id.values() if host.takes_work()]
        holders = [host for host in takers if host.has(model)]
        pool = holders or takers
        healthy = [host for host in pool if host.health.healthy]
        if not healthy:
            return [self._candidate(host, model, trial=False) for host in pool]
        trials = [host for host in pool if host.health.on_trial(now)]
        return [self._candidate(host, model, trial=host in trials) for host in healthy + trials]

    @staticmethod
    def _candidate(host: Host, model: str, trial: bool) -> Candidate:
        return Candidate(host.id, loaded=model in host.loaded, slots=host.slots_for(model), trial=trial)

    async def check(self, host: Host) -> None:
        """Ask a host its models and the loaded ones; its health follows the answer."""
        try:
            async with asyncio.timeout(CHECK_TIMEOUT):
                tags = await host.upstream.fetch_json("GET", "/api/tags")
                running = await host.upstream.fetch_json("GET", "/api/ps")
        except (GatewayError, TimeoutError) as error:
            problem = error.message if isinstance(error, GatewayError) else "no answer to the check"
            newly = host.health.healthy
            host.health.failed(self._clock(), problem)
            if self.on_check is not None:
                self.on_check(host, problem, newly)
            elif newly:
                logger.warning("Ollama host %s is out of service: %s", host.name, problem)
            host.checked_at = self._clock()
            return
        host.models = frozenset(_names(tags))
        host.loaded = frozenset(_names(running))
        ejected = not host.health.healthy
        host.health.answered_check(self._clock())
        if ejected and self.on_check is not None:
            self.on_check(host, None, False)
        host.checked_at = self._clock()

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(host) for host in self if host.config.enabled))


def _names(answer: Any) -> list[str]:
    models = answer.get("models") if isinstance(answer, dict) else None
    if not isinstance(models, list):
        return []
    names = []
    for entry in models:
        name = entry.get("name") or entry.get("model") if isinstance(entry, dict) else None
        if isinstance(name, str):
            names.append(canonical_model(name))
    return names
