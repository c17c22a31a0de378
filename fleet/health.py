"""Whether a host gets work: passive ejection with back-off, and a single trial request before it comes back.

A host that fails (the connection refused or cut before an answer, or a 5xx within FAST_FAILURE_SECONDS,
such as Ollama's 1 ms "server busy") is ejected: no new work for a back-off that doubles with each failure
in a row (BACKOFF_FIRST up to BACKOFF_MAX). After it, the host takes one request at a time (a trial) until
one succeeds. A fast failure is what a least-loaded choice would otherwise reward: a host that answers 503
at once always has the fewest requests in flight (Olla's #144).

The periodic check (fleet.hosts) also counts: a host that does not answer it is ejected the same way; one
that answers again may take its trial at once rather than wait out a back-off grown while it was down.

With REDIS_URL, these rules run in Redis on one record per host, for every replica (fleet.shared_hosts).
"""

from dataclasses import dataclass

FAST_FAILURE_SECONDS = 1.0
BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0


@dataclass
class Health:
    ejected_until: float | None = None  # None: healthy
    backoff: float = 0.0
    failures: int = 0  # in a row
    problem: str | None = None  # the last failure, said without credentials

    @property
    def healthy(self) -> bool:
        return self.ejected_until is None

    def on_trial(self, now: float) -> bool:
        """Ejected, but its back-off is over: it may take one request at a time."""
        return self.ejected_until is not None and now >= self.ejected_until

    def is_trial(self, sent_at: float) -> bool:
        """Whether a request sent at `sent_at` went to this host on trial (after its back-off)."""
        return self.ejected_until is not None and sent_at >= self.ejected_until

    def usable(self, now: float) -> bool:
        return self.ejected_until is None or now >= self.ejected_until

    def succeeded(self) -> None:
        self.ejected_until = None
        self.backoff = 0.0
        self.failures = 0
        self.problem = None

    def failed(self, now: float, problem: str) -> None:
        self.failures += 1
        self.backoff = min(max(self.backoff * 2, BACKOFF_FIRST), BACKOFF_MAX)
        self.ejected_until = now + self.backoff
        self.problem = problem

    def answered_check(self, now: float) -> None:
        """The periodic check got an answer: an ejected host may take its trial now."""
        if self.ejected_until is not None:
            self.ejected_until = min(self.ejected_until, now)
