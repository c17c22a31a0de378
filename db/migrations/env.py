"""Alembic's entry point: migrations run on the connection `db.migrations.upgrade_to_head` hands over."""

from alembic import context

from db.models import Base

connection = context.config.attributes["connection"]
# Batch mode: on SQLite, an ALTER that SQLite can't do in place is a table rebuild.
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
