"""The usage record: what one model call that reached admission used, whatever its outcome.

Counts come from Ollama's own counters when the answer completed (`upstream.counters`, or the `usage` of an
OpenAI-style answer). When they can't (a client that left mid-stream, a cached prompt whose count Ollama
left out, `/v1` answers that carry no durations), the figure is estimated or left unknown (None), and the
record says `estimated`: never a silent zero.
"""

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum


class Outcome(StrEnum):
    COMPLETED = "completed"  # the whole answer was relayed
    CANCELLED = "cancelled"  # the client went away (waiting, before the first byte, or mid-stream)
    UPSTREAM_ERROR = "upstream_error"  # Ollama failed, or could not be reached
    TIMEOUT = "timeout"  # waited longer than its band's queue timeout
    REFUSED = "refused"  # a quota or a cap refused it (429)
    ERROR = "error"  # Ollama answered the request with an error of its own (4xx: an unknown model...)


@dataclass(slots=True)
class UsageRecord:
    at: datetime  # when the request ended (UTC)
    user_id: int
    key_id: int | None  # the API key it came with, if any
    surface: str  # the gateway path it came in on: "/api/chat", "/v1/chat/completions", "/chat"...
    model: str  # as the fleet names it (`fleet.hosts.shown_model`)
    band: str  # "interactive" or "batch"
    outcome: Outcome
    status: int  # the HTTP status the client got
    host: str | None = None  # the host's name, once one was chosen
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    slot_seconds: float | None = None  # prompt_eval_duration + eval_duration
    load_seconds: float | None = None
    model_load: bool = False  # the host had to load the model for this request
    queue_seconds: float = 0.0  # waiting in the gateway's fair queue
    ttfb_seconds: float | None = None  # from arrival to the answer's first byte
    duration_seconds: float = 0.0  # from arrival to the end
    estimated: bool = False  # some figure above is estimated, or unknown
    request_id: str | None = None

    @property
    def tokens(self) -> int:
        return (self.prompt_tokens or 0) + (self.completion_tokens or 0)
