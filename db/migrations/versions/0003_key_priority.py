"""An API key's priority: its requests go in the fair queue's interactive band (the default, what every key
made before was) or its batch band (fleet.scheduler)."""

from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    # A column with its own CHECK: SQLite adds it in place (no table rebuild), as Postgres does.
    op.execute(
        "ALTER TABLE api_keys ADD COLUMN priority TEXT NOT NULL DEFAULT 'interactive' "
        "CONSTRAINT api_keys_priority_check CHECK (priority IN ('interactive', 'batch'))"
    )


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as table:
        table.drop_column("priority")
