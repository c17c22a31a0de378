"""First-start set-up: the JWT signing key and the first admin.

Neither has a working default, and `core.settings` refuses a weak one. A missing `SECRET_KEY` is generated
once and kept in `DATA_DIR` with mode 0600 (`core.private_files`); a missing `ADMIN_PASSWORD` is generated
once and printed to the console, and only its hash is stored.
"""

import os
import secrets
import sys
from pathlib import Path

from auth.passwords import hash_password
from auth.users import UserStore
from core.private_files import make_private_directory, open_new_private_file
from core.settings import MIN_SECRET_KEY_LENGTH, ConfigurationError, Settings
from core.storage_errors import Conflict

SECRET_KEY_FILE = "secret_key"  # noqa: S105 -- a file name, not a secret


def load_secret_key(settings: Settings) -> str:
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value()
    return _read_or_create_key_file(settings.data_dir / SECRET_KEY_FILE)


def _read_or_create_key_file(path: Path) -> str:
    make_private_directory(path.parent)
    try:
        # O_EXCL: when several workers start at once, exactly one creates the key and the others read it.
        fd = open_new_private_file(path)
    except FileExistsError:
        key = path.read_text(encoding="utf-8").strip()
        if len(key) < MIN_SECRET_KEY_LENGTH:
            raise ConfigurationError(
                f"{path} holds no usable key; delete it to have a new one generated"
            ) from None
        return key
    key = secrets.token_urlsafe(48)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(key)
    return key


def ensure_admin(settings: Settings, users: UserStore) -> None:
    """Create the bootstrap admin when the database has none."""
    if users.has_admin():
        return
    # Hashed here, in the start-up's worker thread: once, before anyone can sign in.
    if settings.admin_password is not None:
        _create_admin(settings, users, hash_password(settings.admin_password.get_secret_value()))
        return
    password = secrets.token_urlsafe(15)
    if not _create_admin(settings, users, hash_password(password)):
        return
    # Printed, not logged: it must reach the person starting the gateway once, and no log file.
    print(
        "\n"
        f"  ollama-gateway: created the admin account {settings.admin_email}\n"
        f"  password: {password}\n"
        "  It is shown only this once; only its hash is stored.\n",
        file=sys.stderr,
        flush=True,
    )


def _create_admin(settings: Settings, users: UserStore, password_hash: str) -> bool:
    """Whether this process created the admin. Replicas started together on a new database all find no
    admin: one creates it, and the others' same email conflicts; for them, the admin now exists."""
    try:
        users.create_with_hash(settings.admin_email, password_hash, "admin")
    except Conflict:
        if users.has_admin():
            return False
        raise  # the email is a person's who is not an admin: the operator must choose another
    return True
