"""The gateway's Prometheus metrics: what requests and model calls did (counters and histograms, written as
they happen), and the fleet as it is (gauges, read at scrape time: `observe.fleet_gauges`).

One process (`python main.py`): the metrics live in this module's registry. Several (`uvicorn --workers N`):
with `PROMETHEUS_MULTIPROC_DIR` set in the environment before the process starts, prometheus-client writes
every value to a file per process in that folder, and a scrape, whichever worker answers it, reads and sums
them all (`MultiProcessCollector`). The folder must exist and be emptied before each start (its files are
per process id).

No label names a person: the usage API does that. Model names are bounded (`observe.labels`), surfaces are
route templates, hosts are the configured ones.
"""

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from cluster.redis_link import REGISTRY as REDIS_REGISTRY
from observe.fleet_gauges import PUBLISH_SECONDS, FleetCollector, shared_fleet_gauges
from observe.labels import NO_HOST, ModelLabels
from usage.records import Outcome, UsageRecord

if TYPE_CHECKING:
    from fleet.admission import Fleet

CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

# From a short answer on a loaded model to a cold load of a large one (Ollama sends nothing until then).
FIRST_BYTE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# From a free slot (nothing) to QUEUE_TIMEOUT_BATCH's default.
QUEUE_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

REGISTRY = CollectorRegistry()
MODELS = ModelLabels()

REQUESTS = Counter(
    "gateway_requests",
    "HTTP requests answered, by the route they matched (other: none) and status",
    ["surface", "status"],
    registry=REGISTRY,
)
FIRST_BYTE = Histogram(
    "gateway_time_to_first_byte_seconds",
    "Model calls: seconds from the request's arrival to the answer's first byte",
    ["model", "host"],
    buckets=FIRST_BYTE_BUCKETS,
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "gateway_queue_wait_seconds",
    "Model calls: seconds waited in the gateway's fair queue for a slot",
    ["model", "band"],
    buckets=QUEUE_WAIT_BUCKETS,
    registry=REGISTRY,
)
TOKENS = Counter(
    "gateway_tokens",
    "Tokens of model calls, as Ollama counted them (or estimated), by kind: prompt or completion",
    ["model", "host", "kind"],
    registry=REGISTRY,
)
SLOT_SECONDS = Counter(
    "gateway_slot_seconds",
    "Seconds of Ollama slot time used: prompt evaluation plus generation",
    ["model", "host"],
    registry=REGISTRY,
)
MODEL_LOADS = Counter(
    "gateway_model_loads",
    "Model calls for which the host had to load the model first",
    ["host", "model"],
    registry=REGISTRY,
)


def _child(metric: Any, labels: tuple[str, ...]) -> Any:
    """The series of `metric` for `labels`, found once: prometheus-client's `labels()` checks and locks on
    every call, a cost paid per request otherwise (the bench's short requests saw it). The label values are
    bounded (observe.labels), and so is the cache."""
    child = _CHILDREN.get((metric, labels))
    if child is None:
        child = _CHILDREN[metric, labels] = metric.labels(*labels)
    return child


_CHILDREN: dict[tuple[Any, tuple[str, ...]], Any] = {}


def count_request(surface: str, status: int) -> None:
    _child(REQUESTS, (surface, str(status))).inc()


def record_usage(record: UsageRecord) -> None:
    """What one model call that reached admission used, into the counters and histograms."""
    if record.outcome is Outcome.COMPLETED:
        MODELS.admit(record.model)  # Ollama answered it: a real model, worth a series of its own
    model = MODELS.label(record.model)
    host = record.host or NO_HOST
    _child(QUEUE_WAIT, (model, record.band)).observe(record.queue_seconds)
    if record.ttfb_seconds is not None:
        _child(FIRST_BYTE, (model, host)).observe(record.ttfb_seconds)
    if record.prompt_tokens:
        _child(TOKENS, (model, host, "prompt")).inc(record.prompt_tokens)
    if record.completion_tokens:
        _child(TOKENS, (model, host, "completion")).inc(record.completion_tokens)
    if record.slot_seconds:
        _child(SLOT_SECONDS, (model, host)).inc(record.slot_seconds)
    if record.model_load:
        _child(MODEL_LOADS, (host, model)).inc()


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROCESS_DIR_VARIABLE) or None


def exposition(*extra: Collector) -> bytes:
    """Every metric in Prometheus' text format: this module's and the Redis link's (every process's, in
    multi-process mode), then `extra` collectors' (the fleet's gauges)."""
    path = multiprocess_dir()
    if path is None:
        return generate_latest(_Together([REGISTRY, REDIS_REGISTRY, *extra]))
    return generate_latest(_Together([MultiProcessCollector(None, path=path), *extra]))


def scrape(fleet: "Fleet") -> bytes:
    """What GET /metrics answers: every metric, the fleet's gauges read now."""
    if multiprocess_dir() is None:
        return exposition(FleetCollector(fleet, MODELS))
    shared_fleet_gauges().publish(fleet, MODELS)  # this worker's reading, as fresh as the scrape
    return exposition()


async def publish_fleet_gauges(fleet: "Fleet") -> None:
    """In multi-process mode, for the worker's life: its fleet's gauges, where a scrape of any worker reads
    them. In one process, nothing to do: the scrape reads the fleet itself."""
    if multiprocess_dir() is None:
        return
    gauges = shared_fleet_gauges()
    try:
        await gauges.publish_forever(fleet, MODELS, PUBLISH_SECONDS)
    finally:
        forget_this_process()


def forget_this_process() -> None:
    """In multi-process mode, at a worker's exit: its gauges no longer count (its counters still do)."""
    path = multiprocess_dir()
    if path is not None:
        mark_process_dead(os.getpid(), path)


class _Together:
    def __init__(self, collectors: list[Collector]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterable[Metric]:
        for collector in self._collectors:
            yield from collector.collect()
