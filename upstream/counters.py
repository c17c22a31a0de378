"""Ollama's own counters, read from the end of its answer: the final line of a native stream (`"done": true`)
or the tail of a whole answer (`"stream": false`, `/api/embed`), where Ollama puts them.

    total_duration, load_duration, prompt_eval_count, prompt_eval_duration, eval_count, eval_duration

(durations in nanoseconds). The slot-time a request used is `prompt_eval_duration + eval_duration`; what
`total_duration` holds beyond load, prompt evaluation and generation is time it waited inside Ollama for a
slot (notes: ollama-scheduling). A counter Ollama left out stays None, never 0: a cached prompt may come
without `prompt_eval_count`.

The relay keeps the last bytes it sent. A stream's last line is parsed (`read_final_line`): only its own
top-level fields count. A whole answer can't be parsed from its tail, so its counters are found by pattern
(`read_counters`): they are the last fields of the object, and JSON escapes every quote inside a string, so
a quoted counter name followed by a colon is a key, never text a model wrote (a tool call's arguments are an
object, though: a counter the final fields lack could be taken from one, which is why streams are parsed).
"""

import json
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


COUNTER_NAMES = frozenset(field for field in Counters.__dataclass_fields__)


def read_final_line(tail: bytes) -> Counters | None:
    """The counters of a stream's last line (`"done": true`), or None when it has none."""
    line = tail.rstrip(b"\n").rsplit(b"\n", 1)[-1]
    try:
        final = json.loads(line)
    except ValueError:
        return None
    if not isinstance(final, dict) or final.get("done") is not True:
        return None
    found = {
        name: value
        for name, value in final.items()
        if name in COUNTER_NAMES and isinstance(value, int) and not isinstance(value, bool) and value >= 0
    }
    return Counters(**found) if "total_duration" in found else None
