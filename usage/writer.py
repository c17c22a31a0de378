"""Writes usage records in the background, in batches, so that a stream never waits for the database.

`add` turns the record into its row and appends it to a list (the streaming path's whole cost); a task
writes what piled up every `interval` seconds, on the database's threads. A write that fails (a locked
SQLite, a Postgres restarting) is tried again at the next round with what came since; records are dropped
only beyond `MAX_PENDING` (with a warning), so a database that stays down can't fill the gateway's memory.
`flush` writes what is pending now: the reports call it first, so a person sees the request they just made;
`close` writes the rest at shutdown.
"""

import asyncio
import contextlib
import logging

from sqlalchemy.exc import SQLAlchemyError

from core.storage_errors import StorageError
from db.engine import Database
from usage.records import UsageRecord
from usage.store import UsageStore

logger = logging.getLogger("gateway.usage")

MAX_PENDING = 100_000


class UsageWriter:
    def __init__(self, db: Database, store: UsageStore, interval: float = 0.5) -> None:
        self._db = db
        self._store = store
        self._interval = interval
        self._pending: list[tuple[object, ...]] = []  # rows (usage.store.UsageStore.row)
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()  # one write at a time, in record order
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._write_forever())

    def add(self, record: UsageRecord) -> None:
        self._pending.append(self._store.row(record))
        if len(self._pending) > MAX_PENDING:
            del self._pending[: len(self._pending) - MAX_PENDING]
            logger.warning("usage records could not be written for a while: the oldest were dropped")
        self._wake.set()

    async def flush(self) -> None:
        async with self._lock:
            batch, self._pending = self._pending, []
            if not batch:
                return
            try:
                await self._db.run(self._store.add_rows, batch)
            except (StorageError, SQLAlchemyError) as exc:
                self._pending[:0] = batch  # tried again with the next round
                logger.warning("could not write %d usage records (will try again): %s", len(batch), exc)
                raise

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(StorageError, SQLAlchemyError):
            await self.flush()

    async def _write_forever(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._interval)
            self._wake.clear()
            with contextlib.suppress(StorageError, SQLAlchemyError):
                await self.flush()
