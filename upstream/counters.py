"""Ollama's own counters, read from the end of its answer: the final line of a native stream (`"done": true`)
or the tail of a whole answer (`"stream": false`, `/api/embed`), where Ollama puts them.

    total_duration, load_duration, prompt_eval_count, prompt_eval_duration, eval_count, eval_duration

(durations in nanoseconds). The slot-time a request used is `prompt_eval_duration + eval_duration`; what
`total_duration` holds beyond load, prompt evaluation and generation is time it waited inside Ollama for a
slot (notes: ollama-scheduling). A counter Ollama left out stays None, never 0: a cached prompt may come
without `prompt_eval_count`.

Read by pattern rather than parsed: the relay keeps the last bytes it sent, and the counters are the last
fields of the object. JSON escapes every quote inside a string, so a quoted counter name followed by a colon
can only be a key, never text a model wrote.
"""

import re
from dataclasses import dataclass

_COUNTER = re.compile(
    rb'"(total_duration|load_duration|prompt_eval_count|prompt_eval_duration|eval_count|eval_duration)"'
    rb"\s*:\s*(\d+)"
)
NS = 1e-9


@dataclass(frozen=True)
class Counters:
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None

    @property
    def slot_seconds(self) -> float | None:
        """Seconds a slot was busy with this request: prompt evaluation and generation."""
        if self.prompt_eval_duration is None and self.eval_duration is None:
            return None
        return ((self.prompt_eval_duration or 0) + (self.eval_duration or 0)) * NS

    @property
    def waited_seconds(self) -> float | None:
        """Seconds spent waiting inside Ollama for a slot (give or take a few ms of templating)."""
        if self.total_duration is None or self.load_duration is None:
            return None
        busy = (self.prompt_eval_duration or 0) + (self.eval_duration or 0)
        return max(self.total_duration - self.load_duration - busy, 0) * NS


def read_counters(tail: bytes) -> Counters | None:
    """The counters at the end of an answer (`tail`: its last bytes), or None when it has none. Only the
    final object carries them, so no two can mix."""
    found = {name.decode(): int(value) for name, value in _COUNTER.findall(tail)}
    return Counters(**found) if "total_duration" in found else None
