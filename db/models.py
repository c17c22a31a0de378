"""Every table, once: the typed models the stores read and write, and the schemas of `/docs` read from.

One set of models for both databases (SQLite, the embedded default, and Postgres, the scale-out one); the
migrations in `db/migrations` create the same tables on either. Timestamps are kept as the ISO-8601 text the
API shows (`2026-05-01T12:00:00Z`), as the first releases stored them.
"""

import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

STAMP_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
ROLES = ("admin", "user")
# An API key's requests go in this band of the fair queue (fleet.scheduler): a batch key's after everyone's
# interactive ones.
INTERACTIVE = "interactive"
BATCH = "batch"
PRIORITIES = (INTERACTIVE, BATCH)
OUTCOMES = ("pending", "failed", "succeeded", "forgiven")

# Emails compare without regard to letter case. SQLite's NOCASE collation does it in the column itself (and
# its unique index); Postgres has a unique index on lower(email) instead (db.migrations), and the stores
# compare through `db.engine.Database.same_email`.
EmailText = Text().with_variant(Text(collation="NOCASE"), "sqlite")
# Row ids are 64-bit, as SQLite's are and as the API accepts (routes.schemas.MAX_ROW_ID): on Postgres a
# BIGINT, or a larger id in a path would be bound as a 32-bit integer and fail (500) instead of not matching.
RowId = BigInteger().with_variant(Integer(), "sqlite")


def stamp(moment: datetime | None = None) -> str:
    return (moment or datetime.now(UTC)).strftime(STAMP_FORMAT)


def parse_stamp(text: str) -> datetime:
    return datetime.strptime(text, STAMP_FORMAT).replace(tzinfo=UTC)


def new_identity() -> str:
    """128 random bits, what tokens name (issue 9, item 2)."""
    return secrets.token_hex(16)


class Base(DeclarativeBase):
    pass


class User(Base):
    """A person. `id` names them in the admin API and in the tables that belong to them; `identity`, 128
    random bits, is what tokens name. Neither is ever given to anyone else: ids are never reused (SQLite's
    AUTOINCREMENT, Postgres' identity columns) and identities are random."""

    __tablename__ = "users"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    identity: Mapped[str] = mapped_column(Text, unique=True, default=new_identity)
    email: Mapped[str] = mapped_column(EmailText)
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(Text, default=stamp)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    models: Mapped[list[str] | None] = mapped_column(
        JSON(none_as_null=True), default=None
    )  # None: every model
    # A password change bumps it: tokens issued before name an older version and stop working.
    token_version: Mapped[int] = mapped_column(Integer, default=0)
    # Their own caps in the fair queue (fleet.scheduler); None: the settings', 0: no limit.
    max_inflight: Mapped[int | None] = mapped_column(Integer, default=None)
    max_waiting: Mapped[int | None] = mapped_column(Integer, default=None)
    # Their quota (usage.quotas: period, tokens, slot_seconds, requests); None: unlimited.
    quota: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), default=None)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class ApiKey(Base):
    """A key for scripts; only a SHA-256 hash of the key itself is kept (auth.api_keys)."""

    __tablename__ = "api_keys"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    user_id: Mapped[int] = mapped_column(RowId, ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(Text)
    prefix: Mapped[str] = mapped_column(Text)
    key_hash: Mapped[str] = mapped_column(Text, unique=True)
    created_at: Mapped[str] = mapped_column(Text, default=stamp)
    last_used_at: Mapped[str | None] = mapped_column(Text, default=None)
    expires_at: Mapped[str | None] = mapped_column(Text, default=None)
    priority: Mapped[str] = mapped_column(Text, default=INTERACTIVE)
    quota: Mapped[dict | None] = mapped_column(JSON(none_as_null=True), default=None)  # as a person's

    def is_expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and parse_stamp(self.expires_at) <= (now or datetime.now(UTC))


class Upload(Base):
    """The record of an uploaded file; the file itself is in the uploads folder (uploads.store)."""

    __tablename__ = "uploads"

    filename: Mapped[str] = mapped_column(Text, primary_key=True)
    owner_id: Mapped[int] = mapped_column(RowId, ForeignKey("users.id", ondelete="CASCADE"))
    original_name: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    content_type: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(Text, default=stamp)

    @property
    def download_path(self) -> str:
        return f"/files/{self.filename}"


class LoginAttempt(Base):
    """A sign-in attempt, pending until its password check is done (auth.throttle)."""

    __tablename__ = "login_attempts"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    email: Mapped[str] = mapped_column(EmailText)
    address: Mapped[str] = mapped_column(Text)
    at: Mapped[float] = mapped_column(Float)
    outcome: Mapped[str] = mapped_column(Text)


class KnownAddress(Base):
    """An address a person signed in from, remembered for a while (auth.throttle)."""

    __tablename__ = "known_addresses"

    user_id: Mapped[int] = mapped_column(RowId, ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    address: Mapped[str] = mapped_column(Text, primary_key=True)
    last_success: Mapped[float] = mapped_column(Float)


class StoredHost(Base):
    """An Ollama host an admin added at run time (fleet.store); OLLAMA_URL's hosts are not stored. Ids are
    never reused: the gateway names the host `h<id>` in its API and its logs."""

    __tablename__ = "hosts"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    # With any user:password in it: sent to Ollama, never shown.
    url: Mapped[str] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    draining: Mapped[bool] = mapped_column(Boolean, default=False)
    slots: Mapped[int | None] = mapped_column(Integer, default=None)  # None: learned (fleet.learning)
    created_at: Mapped[str] = mapped_column(Text, default=stamp)


class UsageRow(Base):
    """One usage record (usage.records): what one model call that reached admission used."""

    __tablename__ = "usage_records"

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    at: Mapped[float] = mapped_column(Float)  # seconds since the epoch
    day: Mapped[str] = mapped_column(Text)  # in the gateway's time zone (TIME_ZONE) when recorded
    user_id: Mapped[int] = mapped_column(BigInteger)
    key_id: Mapped[int | None] = mapped_column(BigInteger, default=None)
    surface: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    host: Mapped[str | None] = mapped_column(Text, default=None)
    band: Mapped[str] = mapped_column(Text)
    outcome: Mapped[str] = mapped_column(Text)
    status: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    completion_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    slot_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    load_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    queue_seconds: Mapped[float] = mapped_column(Float)
    ttfb_seconds: Mapped[float | None] = mapped_column(Float, default=None)
    duration_seconds: Mapped[float] = mapped_column(Float)
    estimated: Mapped[bool] = mapped_column(Boolean)
    model_load: Mapped[bool] = mapped_column(Boolean)
    request_id: Mapped[str | None] = mapped_column(Text, default=None)


class AuditEntry(Base):
    """One admin action that succeeded (audit.trail): who, what, to what, when, from where.

    `actor_id` is no foreign key: the trail outlives the people in it (ids are never reused, so it still
    names the one who acted), and `actor` keeps their email as it was. NULL for `manage.py`, the command
    line, which has neither an account nor an address. `details` never holds a secret."""

    __tablename__ = "audit_entries"
    __table_args__ = (Index("audit_entries_by_time", "at"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(RowId, primary_key=True)
    at: Mapped[str] = mapped_column(Text, default=stamp)
    actor_id: Mapped[int | None] = mapped_column(RowId, default=None)
    actor: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    target: Mapped[str | None] = mapped_column(Text, default=None)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), default=None)
    address: Mapped[str | None] = mapped_column(Text, default=None)


# The order a copy fills them in (db.copy): referenced tables first.
TABLES = [
    Base.metadata.tables[name]
    for name in (
        "users",
        "api_keys",
        "uploads",
        "login_attempts",
        "known_addresses",
        "hosts",
        "usage_records",
        "audit_entries",
    )
]
