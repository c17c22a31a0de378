"""What an audit entry says was done: dotted names, the thing acted on first (`user.update`), so that a reader
can ask for every action on one kind of thing by its prefix (`user.`)."""

from enum import StrEnum


class Action(StrEnum):
    USER_CREATE = "user.create"
    USER_UPDATE = "user.update"
    USER_DELETE = "user.delete"
    KEY_CREATE = "key.create"
    KEY_REVOKE = "key.revoke"
    KEY_UPDATE = "key.update"
    HOST_ADD = "host.add"
    HOST_CHANGE = "host.change"
    HOST_REMOVE = "host.remove"


# Model management through Ollama's own routes (`/api/pull`, `/api/blobs/{digest}`...): `model.` and what the
# path names, so that a route Ollama adds later is named without a change here.
MODEL_PREFIX = "model."


def model_action(path: str) -> str:
    """`/api/pull`: `model.pull`; `/api/blobs/{digest}`: `model.blob`."""
    verb = path.removeprefix("/api/").split("/", 1)[0]
    return MODEL_PREFIX + ("blob" if verb == "blobs" else verb)
