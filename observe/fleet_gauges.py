"""The fleet's gauges, read from the fleet itself when Prometheus scrapes (no second copy of its state):
requests waiting per model and band, in flight and slots per host and model, and whether each host is up.

One process: a collector reads them at each scrape. Several (`PROMETHEUS_MULTIPROC_DIR`): each worker has
a fleet of its own, and a scrape reaches only one of them, so every worker writes its reading into gauges
shared through that folder every few seconds (and the one scraped, at the scrape): the scrape sums the
workers' waiting and in-flight requests, and takes the highest slots and the lowest "up" any worker saw.
"""

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from prometheus_client import Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from fleet.hosts import shown_model
from observe.labels import ModelLabels

if TYPE_CHECKING:
    from fleet.admission import Fleet

REMOVED_HOST = "removed"  # a host taken out while requests it runs finish
PUBLISH_SECONDS = 5.0

Series = dict[tuple[str, ...], float]
Mode = Literal["livesum", "livemax", "livemin"]


@dataclass
class FleetReading:
    queue_depth: Series = field(default_factory=dict)  # (model, band)
    inflight: Series = field(default_factory=dict)  # (host, model)
    slots: Series = field(default_factory=dict)  # (host, model); only where known
    host_up: Series = field(default_factory=dict)  # (host,)


# name, help, label names, multi-process mode, the reading's field
_GAUGES: tuple[tuple[str, str, tuple[str, ...], Mode, str], ...] = (
    ("gateway_queue_depth", "Model calls waiting for a slot", ("model", "band"), "livesum", "queue_depth"),
    ("gateway_inflight", "Model calls running on a host", ("host", "model"), "livesum", "inflight"),
    (
        "gateway_slots",
        "Requests a host runs at once for a model (configured or learned; absent while unknown)",
        ("host", "model"),
        "livemax",
        "slots",
    ),
    (
        "gateway_host_up",
        "1 while a host is enabled and in service (answers its checks and requests), else 0",
        ("host",),
        "livemin",
        "host_up",
    ),
)


def read_fleet(fleet: "Fleet", models: ModelLabels) -> FleetReading:
    """The fleet now, every model name folded as the counters fold it (names that fold together add up)."""
    reading = FleetReading()
    scheduler = fleet.scheduler
    names = {host.id: host.name for host in fleet.hosts}
    for model in scheduler.waiting_models():
        label = models.label(shown_model(model))
        for band, count in scheduler.waiting(model).items():
            _add(reading.queue_depth, (label, band), count)
    inflight = scheduler.inflight_by_slot()
    for (host_id, model), count in inflight.items():
        _add(reading.inflight, (names.get(host_id, REMOVED_HOST), models.label(shown_model(model))), count)
    for host in fleet.hosts:
        reading.host_up[(host.name,)] = float(host.config.enabled and host.health.healthy)
        running = {model for (host_id, model) in inflight if host_id == host.id}
        for model in running | host.loaded:
            slots = host.slots_for(model)
            if slots is not None:
                _add(reading.slots, (host.name, models.label(shown_model(model))), slots)
    return reading


def _add(series: Series, labels: tuple[str, ...], value: float) -> None:
    series[labels] = series.get(labels, 0.0) + value


class FleetCollector:
    """The fleet's gauges for one process's scrape."""

    def __init__(self, fleet: "Fleet", models: ModelLabels) -> None:
        self._fleet = fleet
        self._models = models

    def collect(self) -> Iterable[Metric]:
        reading = read_fleet(self._fleet, self._models)
        for name, documentation, labels, _, attribute in _GAUGES:
            family = GaugeMetricFamily(name, documentation, labels=labels)
            for values, value in getattr(reading, attribute).items():
                family.add_metric(values, value)
            yield family


class SharedFleetGauges:
    """The fleet's gauges written where every worker's are summed (multi-process mode). A series this worker
    no longer has (a model nobody waits for now) is set to 0, not left at its last value."""

    def __init__(self) -> None:
        self._gauges = {
            attribute: Gauge(name, documentation, labels, registry=None, multiprocess_mode=mode)
            for name, documentation, labels, mode, attribute in _GAUGES
        }
        self._written: dict[str, set[tuple[str, ...]]] = {attribute: set() for attribute in self._gauges}

    def publish(self, fleet: "Fleet", models: ModelLabels) -> None:
        reading = read_fleet(fleet, models)
        for attribute, gauge in self._gauges.items():
            series: Series = getattr(reading, attribute)
            for values in self._written[attribute] - series.keys():
                gauge.labels(*values).set(0)
            for values, value in series.items():
                gauge.labels(*values).set(value)
            self._written[attribute] |= series.keys()

    async def publish_forever(self, fleet: "Fleet", models: ModelLabels, seconds: float) -> None:
        while True:
            self.publish(fleet, models)
            await asyncio.sleep(seconds)


_shared: SharedFleetGauges | None = None


def shared_fleet_gauges() -> SharedFleetGauges:
    """The process's one set: two would write the same series over each other."""
    global _shared
    if _shared is None:
        _shared = SharedFleetGauges()
    return _shared
