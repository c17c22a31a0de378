"""Slots learned from Ollama's own timings, for a host whose OLLAMA_NUM_PARALLEL nobody told the gateway.

Ollama says nothing of its slots (notes: ollama-scheduling), but every final line does: what `total_duration`
holds beyond load, prompt evaluation and generation is time the request waited inside Ollama for a slot. So,
per (host, model), while its slots are unknown and requests pass straight through:
- a request that did not wait ran beside the others in flight when it was sent: the model has at least
  that many slots;
- a request that waited (`WAITED_SECONDS` or more, seen `EVIDENCE` times) was sent when every slot was busy.
Then the slots are the most requests seen running at once without waiting (at least 1), and from there the
gateway holds the rest in its own queue. What it learned is logged and shown in `/admin/hosts`. It learns
also where slots are configured, as a ceiling: Ollama forces one slot on some model families whatever its
OLLAMA_NUM_PARALLEL says. Only answers that say how long the model worked count (an embedding's does not:
its time would all look like a wait). Learned slots hold until the gateway restarts or the host's slots are
set again. With REDIS_URL, the replicas learn together, by these same rules run in Redis, and a learned
value lasts an hour (fleet.shared_hosts).
"""

import logging
from dataclasses import dataclass

logger = logging.getLogger("gateway.fleet")

# Templating and tokenising take a few ms that the final line counts in no phase; more than this is a wait.
WAITED_SECONDS = 0.05
# Waits seen before concluding, so that one slow tokenisation does not set the slots.
EVIDENCE = 2


@dataclass
class SlotLearner:
    """What was seen of one (host, model) whose slots are unknown."""

    ran_at_once: int = 0  # the most requests in flight together, none of which had to wait
    waits: int = 0
    learned: int | None = None

    def observe(self, inflight_when_sent: int, waited_seconds: float | None) -> int | None:
        """Take one finished request: how many were in flight (itself included) when it was sent, and how
        long it waited inside Ollama. Returns the slots when this observation settles them."""
        if self.learned is not None or waited_seconds is None:
            return None
        if waited_seconds < WAITED_SECONDS:
            self.ran_at_once = max(self.ran_at_once, inflight_when_sent)
            return None
        if inflight_when_sent <= self.ran_at_once:
            return None  # it waited although fewer ran than have run without waiting: not a slot wait
        self.waits += 1
        if self.waits < EVIDENCE:
            return None
        self.learned = max(self.ran_at_once, 1)
        return self.learned
