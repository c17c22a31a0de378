"""Admins changing the fleet while it runs (`/admin/hosts`): hosts added, changed, drained and removed.

A stored host's change is written to the database first (fleet.store), then applied here at once; other
gateway processes take it up at their next periodic check. OLLAMA_URL's hosts may be disabled, enabled,
drained or resumed at run time, but that is not stored: at the next start they are what the environment says
(enabled, not draining). Their name, URL and slots are the environment's, and they leave the fleet by leaving
OLLAMA_URL: changing those here is refused (Conflict).

Draining and disabling both stop new work at once and let what runs finish; a disabled host is not checked
either, and takes no model management. Removal is the same for what runs (it finishes; the host's
connections close as each request ends), and the host is gone for new work at once, without a drain first.
"""

from collections.abc import Awaitable
from dataclasses import replace

from core.storage_errors import Conflict, NotFound
from db.engine import Database
from fleet.admission import Fleet
from fleet.hosts import ENVIRONMENT, Host, HostConfig
from fleet.store import (
    NO_SUCH_HOST,
    HostChange,
    HostStore,
    StoredHost,
    refuse_clashes,
    row_id_of,
    stored_config,
)


def _from_environment(host: Host, what: str) -> Conflict:
    return Conflict(f"{host.id} ({host.name}) comes from OLLAMA_URL: {what}")


FOR_NOW = "at run time, only enabled and draining change (until the next start)"


class HostChanges:
    def __init__(self, fleet: Fleet, db: Database, store: HostStore) -> None:
        self._fleet = fleet
        self._db = db
        self._store = store

    def _configs(self) -> list[HostConfig]:
        return [host.config for host in self._fleet.hosts]

    async def add(self, name: str, url: str, *, slots: int | None = None, enabled: bool = True) -> Host:
        """Store a new host and send it work at once (once its check has said which models it holds)."""
        refuse_clashes(name, url, self._configs())
        row = await self._db.run(self._store.add, name, url, slots=slots, enabled=enabled)
        return self._fleet.put(stored_config(row))

    async def change(self, host_id: str, change: HostChange) -> Host:
        host = self._fleet.hosts.by_id.get(host_id)
        if host is not None and host.config.source == ENVIRONMENT:
            return self._change_for_now(host, change)
        row_id = row_id_of(host_id)
        if row_id is None:
            raise NotFound(NO_SUCH_HOST)
        refuse_clashes(change.name, change.url, self._configs(), itself=host_id)
        row = await self._gone_if_not_found(host_id, self._db.run(self._store.change, row_id, change))
        return self._fleet.put(stored_config(row))

    async def remove(self, host_id: str) -> None:
        host = self._fleet.hosts.by_id.get(host_id)
        if host is not None and host.config.source == ENVIRONMENT:
            raise _from_environment(
                host, "it leaves the fleet when taken out of OLLAMA_URL; to send it no new work now, drain it"
            )
        row_id = row_id_of(host_id)
        if row_id is None:
            raise NotFound(NO_SUCH_HOST)
        await self._gone_if_not_found(host_id, self._db.run(self._store.remove, row_id))
        self._fleet.remove(host_id)

    async def _gone_if_not_found(self, host_id: str, stored: Awaitable[StoredHost]) -> StoredHost:
        """A host removed from the database elsewhere (manage.py, another replica) before this process's
        next check: it goes here too, and the change is answered as for any host not found."""
        try:
            return await stored
        except NotFound:
            self._fleet.remove(host_id)
            raise

    def _change_for_now(self, host: Host, change: HostChange) -> Host:
        """An environment host: enabled and draining change until the next start; nothing else changes."""
        config = host.config
        if (change.name is not None and change.name != config.name) or (
            change.url is not None and change.url != config.url
        ):
            raise _from_environment(host, f"its URL, and the name made of it, are set there; {FOR_NOW}")
        if (change.slots is not None or change.learn_slots) and change.slots != config.slots:
            raise _from_environment(host, f"its slots are OLLAMA_PARALLEL; {FOR_NOW}")
        return self._fleet.put(
            replace(
                config,
                enabled=config.enabled if change.enabled is None else change.enabled,
                draining=config.draining if change.draining is None else change.draining,
            )
        )
