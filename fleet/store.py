"""The hosts admins add at run time, kept in the database (`hosts`); OLLAMA_URL's are read at every start and
never stored.

`/admin/hosts` writes here and applies the change at once (fleet.changes); `manage.py` writes here only.
Every gateway process reads the stored hosts at start, and again at every periodic check
(`Fleet.check_now`, every HOST_CHECK_SECONDS): a change made by `manage.py` or by another replica sharing
the database reaches it within that time.

A stored host is named `h<row id>` in the API, the logs and X-Ollama-Host; row ids are never reused, so a
removed host's id never comes to name another.

Every method of `HostStore` blocks: from async code, call it through `Database.run`.
"""

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from yarl import URL

from core.setting_checks import checked_upstream_url
from core.storage_errors import Conflict, NotFound
from db.engine import Database
from db.models import StoredHost
from fleet.hosts import STORED, HostConfig

logger = logging.getLogger("gateway.fleet")

__all__ = ["HostChange", "HostStore", "StoredHost", "refuse_clashes", "row_id_of", "stored_config"]

STORED_PREFIX = "h"
MAX_ROW_ID = 2**63 - 1
# What a host's id looks like (`h3`, `env-1`): X-Ollama-Host takes a name or an id, so no name may be one.
_ID_FORM = re.compile(r"(h|env-)[0-9]+", re.IGNORECASE)
NO_SUCH_HOST = "no such host"


def stored_id(row_id: int) -> str:
    return f"{STORED_PREFIX}{row_id}"


def row_id_of(host_id: str) -> int | None:
    """The row of a stored host's id (`h3`: 3); None for any other id."""
    digits = host_id.removeprefix(STORED_PREFIX)
    if digits == host_id or not digits.isascii() or not digits.isdigit():
        return None
    number = int(digits)
    return number if 0 < number <= MAX_ROW_ID else None


def stored_config(row: StoredHost) -> HostConfig:
    return HostConfig(
        id=stored_id(row.id),
        name=row.name,
        url=row.url,
        source=STORED,
        enabled=row.enabled,
        draining=row.draining,
        slots=row.slots,
    )


def _address(url: str) -> tuple[str, str, int | None, str]:
    """Where a URL leads, whatever credentials it carries and however its host is written."""
    parsed = URL(url)
    return parsed.scheme, (parsed.host or "").lower().rstrip("."), parsed.port, parsed.path.rstrip("/")


def refuse_clashes(
    name: str | None, url: str | None, hosts: Iterable[HostConfig], itself: str | None = None
) -> None:
    """Conflict if another host has this name (whatever the letter case: X-Ollama-Host names a host by it)
    or is this Ollama (the same address, whatever credentials: one Ollama counted as two hosts would be
    sent twice its slots). A name may not look like an id either (`h3`, `env-1`)."""
    if name is not None and _ID_FORM.fullmatch(name):
        raise Conflict(f"a host's name can't look like a host's id ({name}): ids are h1, h2, ..., env-1, ...")
    address = _address(url) if url is not None else None
    for other in hosts:
        if other.id == itself:
            continue
        if name is not None and other.name.lower() == name.lower():
            raise Conflict(f"another host ({other.id}) is named {other.name}")
        if address is not None and _address(other.url) == address:
            raise Conflict(f"that Ollama is already a host: {other.id} ({other.name})")


@dataclass(frozen=True)
class HostChange:
    """What to change of a stored host; None: unchanged. `learn_slots`: forget the slots set, learn them."""

    name: str | None = None
    url: str | None = None
    enabled: bool | None = None
    draining: bool | None = None
    slots: int | None = None
    learn_slots: bool = False


class HostStore:
    def __init__(self, db: Database) -> None:
        self._db = db

    def all(self) -> list[StoredHost]:
        with self._db.session() as session:
            return list(session.scalars(select(StoredHost).order_by(StoredHost.id)))

    def configs(self) -> list[HostConfig]:
        """Every stored host, as the fleet runs it; one whose URL can't be used (written into the table by
        hand) is left out, and said in the log."""
        configs = []
        for row in self.all():
            try:
                checked_upstream_url(row.url)
            except ValueError as exc:
                logger.warning(
                    "stored Ollama host %s (%s) left out: its URL can't be used: %s", row.id, row.name, exc
                )
                continue
            configs.append(stored_config(row))
        return configs

    def add(self, name: str, url: str, *, slots: int | None = None, enabled: bool = True) -> StoredHost:
        """Store a new host. Conflict if the name is taken."""
        row = StoredHost(name=name, url=url, slots=slots, enabled=enabled, draining=False)
        try:
            with self._db.transaction() as session:
                session.add(row)
        except IntegrityError:
            raise Conflict(f"a host named {name} already exists") from None
        return row

    def change(self, row_id: int, change: HostChange) -> StoredHost:
        """Change what is given, in one transaction. NotFound if there is no such host, Conflict if the new
        name is taken."""
        try:
            with self._db.transaction() as session:
                row = session.get(StoredHost, row_id, with_for_update=True)
                if row is None:
                    raise NotFound(NO_SUCH_HOST)
                if change.name is not None:
                    row.name = change.name
                if change.url is not None:
                    row.url = change.url
                if change.enabled is not None:
                    row.enabled = change.enabled
                if change.draining is not None:
                    row.draining = change.draining
                if change.slots is not None or change.learn_slots:
                    row.slots = change.slots
        except IntegrityError:
            raise Conflict(f"a host named {change.name} already exists") from None
        return row

    def remove(self, row_id: int) -> StoredHost:
        """The host removed. NotFound if there is no such host."""
        with self._db.transaction() as session:
            row = session.get(StoredHost, row_id, with_for_update=True)
            if row is None:
                raise NotFound(NO_SUCH_HOST)
            session.delete(row)
        return row
