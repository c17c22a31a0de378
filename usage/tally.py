"""One model call's usage, from admission to its end: whatever happens, it makes exactly one record.

The route opens a `Tally` once it knows who asks for which model; the dispatch tells it where the request
went and how it ended: `finish` when no answer was relayed, `relay_ended` when one was (the first of the
two to be called wins). That becomes a `UsageRecord`, handed to the sink (`usage.book`: the writer, the
quotas, the metrics, the access log).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from upstream.counters import NS, Counters
from upstream.passthrough import RelayEnd
from usage.quotas import Hold, Subject
from usage.reading import prompt_estimate, read_openai_usage, relayed_tokens
from usage.records import Outcome, UsageRecord


class RecordHolder(Protocol):
    """The access log's entry for the request (observe.request_log): says what it used, under its id."""

    request_id: str
    usage: UsageRecord | None


@dataclass(slots=True)
class Tally:
    sink: Callable[["Tally", UsageRecord], None]
    user_id: int
    key_id: int | None
    surface: str
    model: str
    band: str
    openai: bool  # the OpenAI-style API: counts in `usage`, no durations
    embeds: bool
    body_bytes: int
    holder: RecordHolder | None = None  # the access log's entry, told the record
    arrived: float = field(default_factory=time.monotonic)
    host: str | None = None
    queue_seconds: float = 0.0
    sent_at: float | None = None  # when it went to Ollama
    subjects: list[Subject] = field(default_factory=list)  # whose quotas it counts against
    hold: Hold | None = None  # what the quotas hold for it while it runs (usage.quotas)
    done: bool = False

    def dispatched(self, host: str, waited: float) -> None:
        """Sent to `host` after `waited` seconds in the queue (again, after a failover: the waits add up)."""
        self.host = host
        self.queue_seconds += waited
        self.sent_at = time.monotonic()

    def finish(self, outcome: Outcome, status: int) -> None:
        """A request that ended with no answer relayed: refused, timed out, failed by Ollama, or left while
        it waited. If it was sent, it held a slot (by the clock) but nothing it wrote reached anyone."""
        record = self._new_record(outcome, status, None)
        if record is None:
            return
        record.prompt_tokens = record.completion_tokens = 0
        record.slot_seconds = self._clock_seconds()
        record.estimated = self.sent_at is not None
        self.sink(self, record)

    def relay_ended(self, end: RelayEnd, counters: Counters | None, model_load: bool) -> None:
        """The relayed answer ended: completed (with Ollama's `counters`, for a native answer), or cut
        short by the client or by Ollama."""
        if end.completed:
            outcome = Outcome.COMPLETED
        elif end.client_gone:
            outcome = Outcome.CANCELLED
        else:
            outcome = Outcome.UPSTREAM_ERROR
        record = self._new_record(outcome, 200, end.first_byte_at)
        if record is None:
            return
        record.model_load = model_load
        if not end.completed:
            self._estimated(record, end)
        elif self.openai:
            self._openai_counts(record, end)
        elif counters is not None:
            self._native_counts(record, counters)
        else:
            self._estimated(record, end)
        self.sink(self, record)

    def _new_record(self, outcome: Outcome, status: int, first_byte_at: float | None) -> UsageRecord | None:
        if self.done:
            return None
        self.done = True
        return UsageRecord(
            at=datetime.now(UTC),
            user_id=self.user_id,
            key_id=self.key_id,
            surface=self.surface,
            model=self.model,
            band=self.band,
            outcome=outcome,
            status=status,
            host=self.host,
            queue_seconds=self.queue_seconds,
            ttfb_seconds=None if first_byte_at is None else first_byte_at - self.arrived,
            duration_seconds=time.monotonic() - self.arrived,
            request_id=getattr(self.holder, "request_id", None),
        )

    def _openai_counts(self, record: UsageRecord, end: RelayEnd) -> None:
        counts = read_openai_usage(end.held or end.tail)
        record.prompt_tokens = counts.prompt if counts else None
        record.completion_tokens = 0 if self.embeds else (counts.completion if counts else None)
        record.slot_seconds = self._clock_seconds()  # the OpenAI-style answers carry no durations
        record.estimated = True

    def _native_counts(self, record: UsageRecord, counters: Counters) -> None:
        record.prompt_tokens = counters.prompt_eval_count
        record.completion_tokens = 0 if self.embeds else counters.eval_count
        record.load_seconds = None if counters.load_duration is None else counters.load_duration * NS
        record.slot_seconds = counters.slot_seconds
        if record.slot_seconds is None and counters.total_duration is not None:
            # An embedding's answer says only its total: the time it took, less the model's load.
            record.slot_seconds = (counters.total_duration - (counters.load_duration or 0)) * NS
        # A cached prompt may come without its count: unknown, never a silent zero.
        record.estimated = record.prompt_tokens is None or record.completion_tokens is None

    def _estimated(self, record: UsageRecord, end: RelayEnd) -> None:
        """Cut short (never drained to count it: the slot goes back at once), or no counters: what was
        relayed, by the clock."""
        record.prompt_tokens = prompt_estimate(self.body_bytes)
        record.completion_tokens = 0 if self.embeds else relayed_tokens(end.lines, end.event_stream)
        record.slot_seconds = self._clock_seconds()
        record.estimated = True

    def _clock_seconds(self) -> float:
        return 0.0 if self.sent_at is None else time.monotonic() - self.sent_at
