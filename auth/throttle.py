"""Login throttling: after too many failed logins for one email, or from one address, within a window,
further attempts are refused with 429 until the oldest failure leaves the window.

Failures are kept in the database, so every worker process and a restart see the same counts. A successful
login clears its email's failures. Checking the count before the password means a throttled attacker learns
nothing from further guesses.
"""

import math
import time

from core.database import Database


class LoginThrottle:
    def __init__(self, db: Database, max_failures: int, window_seconds: float) -> None:
        self._db = db
        self.max_failures = max_failures
        self.window = window_seconds

    def retry_after(self, email: str, address: str) -> int | None:
        """Seconds until another attempt is allowed, or None if one is allowed now (blocking)."""
        now = time.time()
        waits = [self._wait(column, value, now) for column, value in (("email", email), ("address", address))]
        wait = max(waits)
        return math.ceil(wait) if wait > 0 else None

    def _wait(self, column: str, value: str, now: float) -> float:
        recent = self._db.fetch_all(
            f"SELECT failed_at FROM login_failures WHERE {column} = ? AND failed_at > ? ORDER BY failed_at",  # noqa: S608
            (value, now - self.window),
        )
        if len(recent) < self.max_failures:
            return 0.0
        # The attempt is allowed again once enough of the oldest failures have left the window.
        unlocking = recent[len(recent) - self.max_failures]["failed_at"]
        return unlocking + self.window - now

    def record_failure(self, email: str, address: str) -> None:
        now = time.time()
        with self._db.transaction() as conn:
            conn.execute(
                "INSERT INTO login_failures (email, address, failed_at) VALUES (?, ?, ?)",
                (email, address, now),
            )
            conn.execute("DELETE FROM login_failures WHERE failed_at <= ?", (now - self.window,))

    def forget_failures(self, email: str) -> None:
        with self._db.transaction() as conn:
            conn.execute("DELETE FROM login_failures WHERE email = ?", (email,))
