"""The audit trail of admin actions (audit.trail): who did what to which person, key, host or model, when and
from where. Ids are never reused (AUTOINCREMENT, an identity column): `GET /admin/audit` pages by them."""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"

_NOW_POSTGRES = sa.text("""to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS"Z"')""")
_NOW_SQLITE = sa.text("(strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))")


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "audit_entries",
        sa.Column("id", sa.Integer, primary_key=True)
        if sqlite
        else sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("at", sa.Text, nullable=False, server_default=_NOW_SQLITE if sqlite else _NOW_POSTGRES),
        # No foreign key: an entry outlives the person who acted (NULL: manage.py).
        sa.Column("actor_id", sa.Integer if sqlite else sa.BigInteger),
        sa.Column("actor", sa.Text, nullable=False),
        sa.Column("action", sa.Text, nullable=False),
        sa.Column("target", sa.Text),
        sa.Column("details", sa.JSON),
        sa.Column("address", sa.Text),
        sqlite_autoincrement=True,
    )
    op.create_index("audit_entries_by_time", "audit_entries", ["at"])


def downgrade() -> None:
    op.drop_table("audit_entries")
