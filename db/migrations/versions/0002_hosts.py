"""Ollama hosts added by admins at run time (`/admin/hosts`, `manage.py add-host`); OLLAMA_URL's are read
at every start and never stored. Ids are never reused (AUTOINCREMENT, an identity column): the API names a
stored host `h<id>`, and a removed host's id must not come to name another."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"

_NOW_POSTGRES = sa.text("""to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')""")
_NOW_SQLITE = sa.text("(strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))")


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    now = _NOW_SQLITE if sqlite else _NOW_POSTGRES
    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer, primary_key=True)
        if sqlite
        else sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("name", sa.Text, nullable=False, unique=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("draining", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("slots", sa.Integer),
        sa.Column("created_at", sa.Text, nullable=False, server_default=now),
        sa.CheckConstraint("slots IS NULL OR slots > 0", name="hosts_slots_check"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    op.drop_table("hosts")
