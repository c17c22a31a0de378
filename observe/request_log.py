"""What the access log says of one request, filled in as the request is served.

The access log middleware (`observe.access_log`) puts one `RequestLog` in the request's scope before
anything else sees the request; the credentials guard names the caller, a model call leaves its usage
record; the line is written once the answer has ended.
"""

from dataclasses import dataclass

from starlette.types import Scope

from usage.records import UsageRecord

SCOPE_KEY = "gateway.request_log"


@dataclass(slots=True)
class RequestLog:
    request_id: str
    user_id: int | None = None
    key_id: int | None = None
    usage: UsageRecord | None = None  # a model call's, with its model, host, waits and tokens


def request_log(scope: Scope) -> RequestLog | None:
    """This request's log entry, if the access log is on the request's path (it always is in the app)."""
    entry = scope.get(SCOPE_KEY)
    return entry if isinstance(entry, RequestLog) else None
