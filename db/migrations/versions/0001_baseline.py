"""The schema as the last release before Alembic left it: users, API keys, uploads, sign-in attempts and
known addresses.

On SQLite it is built by the steps those releases ran (db.legacy), from wherever the database stands, so a
database they made is upgraded in place, its rows kept. On Postgres, where no earlier release ran, the same
tables are created directly. Ids are never reused on either: SQLite's AUTOINCREMENT, Postgres' identity
columns (issue 9, item 2).
"""

import sqlalchemy as sa
from alembic import op

from db import legacy

revision = "0001"
down_revision = None

# The default timestamps, in the text form the API shows (db.models.stamp).
_NOW = sa.text("""to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')""")
# 128 random bits as 32 hex digits, for users added by hand in SQL (the gateway gives its own).
_RANDOM_IDENTITY = sa.text("replace(gen_random_uuid()::text, '-', '')")


def upgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "sqlite":
        legacy.upgrade(conn)
        return
    op.create_table(
        "users",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("identity", sa.Text, nullable=False, unique=True, server_default=_RANDOM_IDENTITY),
        sa.Column("email", sa.Text, nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False, server_default=_NOW),
        sa.Column("disabled", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("models", sa.JSON),
        sa.Column("token_version", sa.Integer, nullable=False, server_default="0"),
        sa.CheckConstraint("role IN ('admin', 'user')", name="users_role_check"),
    )
    op.create_index("users_email_key", "users", [sa.text("lower(email)")], unique=True)
    op.create_table(
        "api_keys",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("prefix", sa.Text, nullable=False),
        sa.Column("key_hash", sa.Text, nullable=False, unique=True),
        sa.Column("created_at", sa.Text, nullable=False, server_default=_NOW),
        sa.Column("last_used_at", sa.Text),
        sa.Column("expires_at", sa.Text),
    )
    op.create_index("api_keys_by_user", "api_keys", ["user_id"])
    op.create_table(
        "uploads",
        sa.Column("filename", sa.Text, primary_key=True),
        sa.Column("owner_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("original_name", sa.Text, nullable=False),
        sa.Column("size", sa.BigInteger, nullable=False),
        sa.Column("content_type", sa.Text, nullable=False),
        sa.Column("created_at", sa.Text, nullable=False, server_default=_NOW),
    )
    op.create_index("uploads_by_owner", "uploads", ["owner_id"])
    op.create_table(
        "login_attempts",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("email", sa.Text, nullable=False),
        sa.Column("address", sa.Text, nullable=False),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.CheckConstraint(
            "outcome IN ('pending', 'failed', 'succeeded', 'forgiven')", name="login_attempts_outcome_check"
        ),
    )
    op.create_index("login_attempts_by_email", "login_attempts", [sa.text("lower(email)"), "at"])
    op.create_index("login_attempts_by_address", "login_attempts", ["address", "at"])
    op.create_index("login_attempts_by_time", "login_attempts", ["at"])
    op.create_table(
        "known_addresses",
        sa.Column("user_id", sa.BigInteger, sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("address", sa.Text, primary_key=True),
        sa.Column("last_success", sa.Float, nullable=False),
    )
    op.create_index("known_addresses_by_time", "known_addresses", ["last_success"])


def downgrade() -> None:
    raise NotImplementedError("the first schema has nothing before it")
