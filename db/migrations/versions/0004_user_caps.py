"""A person's own caps in the fair queue, set by an admin: requests in flight and requests waiting at once.
NULL: the settings' (MAX_INFLIGHT_PER_USER, MAX_WAITING_PER_USER); 0: no limit (fleet.scheduler)."""

from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    for column in ("max_inflight", "max_waiting"):
        op.execute(
            f"ALTER TABLE users ADD COLUMN {column} INTEGER "
            f"CONSTRAINT users_{column}_check CHECK ({column} IS NULL OR {column} >= 0)"
        )


def downgrade() -> None:
    with op.batch_alter_table("users") as table:
        table.drop_column("max_waiting")
        table.drop_column("max_inflight")
