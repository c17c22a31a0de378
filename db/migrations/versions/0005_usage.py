"""One usage record per model call that reached admission (usage.records), and the quotas an admin sets on
a person or an API key (usage.quotas). Records keep no foreign key: what a removed person or key used stays
counted in the reports.

And a counter of credential changes (`credential_changes`, one row), bumped by every transaction that
changes a credential on SQLite (db.engine): usage records are now written twice a second, and SQLite's own
sign of a change (`PRAGMA data_version`) counts every commit, so the authentication cache (db.changes)
looks at this counter before it forgets what it knows."""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"


def upgrade() -> None:
    sqlite = op.get_bind().dialect.name == "sqlite"
    op.create_table(
        "usage_records",
        sa.Column("id", sa.Integer, primary_key=True)
        if sqlite
        else sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("at", sa.Float, nullable=False),  # seconds since the epoch (UTC)
        sa.Column("day", sa.Text, nullable=False),  # YYYY-MM-DD in the gateway's time zone when recorded
        sa.Column("user_id", sa.BigInteger, nullable=False),
        sa.Column("key_id", sa.BigInteger),
        sa.Column("surface", sa.Text, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("host", sa.Text),
        sa.Column("band", sa.Text, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("status", sa.Integer, nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger),
        sa.Column("completion_tokens", sa.BigInteger),
        sa.Column("slot_seconds", sa.Float),
        sa.Column("load_seconds", sa.Float),
        sa.Column("queue_seconds", sa.Float, nullable=False),
        sa.Column("ttfb_seconds", sa.Float),
        sa.Column("duration_seconds", sa.Float, nullable=False),
        sa.Column("estimated", sa.Boolean, nullable=False),
        sa.Column("model_load", sa.Boolean, nullable=False),
        sa.Column("request_id", sa.Text),
    )
    op.create_index("usage_records_at", "usage_records", ["at"])
    op.create_index("usage_records_user_at", "usage_records", ["user_id", "at"])
    op.create_index("usage_records_key_at", "usage_records", ["key_id", "at"])
    for table in ("users", "api_keys"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("quota", sa.JSON))
    op.create_table(
        "credential_changes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.CheckConstraint("id = 1", name="credential_changes_one_row"),
    )
    op.execute("INSERT INTO credential_changes (id, version) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("credential_changes")
    for table in ("api_keys", "users"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("quota")
    op.drop_table("usage_records")
