"""What the storage layer raises: its own errors, never HTTP ones. The web layer says them as HTTP
(`core.errors`: 404, 409, 503), `manage.py` as one line on its command line."""


class StorageError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NotFound(StorageError):
    """A row the change needs is not there (say, a user removed while their request was on the way)."""


class Conflict(StorageError):
    """The change would break a rule the data keeps: an email already taken, the last enabled admin."""


class Busy(StorageError):
    """The database did not answer in time (another writer held it past the busy timeout): try again."""
