"""Who took an action: a person signed in to the API, from an address, or the command line (`manage.py`),
which has neither an account nor an address."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Actor:
    id: int | None  # the user's id; None: the command line
    name: str  # their email as it is now (an entry keeps it if it changes later), or "manage.py"
    address: str | None  # the client's address (core.client_address); None: the command line


COMMAND_LINE = Actor(id=None, name="manage.py", address=None)
