"""The gateway's storage: SQLAlchemy models, the engine and its sessions, and the migrations (Alembic)."""
