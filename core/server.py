"""How the gateway's process serves HTTP: uvicorn's httptools protocol with a request-head timeout, and an
open-file limit fit for many connections.

uvicorn times out idle kept-alive connections (`timeout_keep_alive`), but not a client that connects and
sends nothing, or sends its request head a byte at a time: each such connection holds a socket and a file
descriptor for as long as the client likes, and a few thousand of them exhaust the process. The protocol
below closes a connection whose request head is not complete within REQUEST_HEADER_TIMEOUT seconds.

The protocol also keeps the TCP peer's address in the request scope (`core.client_address`): uvicorn's own
proxy-header handling, on by default for 127.0.0.1, would otherwise replace it with whatever a client wrote
in `X-Forwarded-For`.

`python main.py` uses it. With uvicorn's own command line, pass it as
`uvicorn main:app --http core.server:HeaderTimeoutProtocol` (it then reads REQUEST_HEADER_TIMEOUT from the
settings itself). The app refuses to start under a server that was not given it
(`require_gateway_protocol`): nothing else would time out a client that never finishes its request head.
"""

import asyncio
import json
import logging

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.client_address import PEER_EXTENSION
from core.settings import ConfigurationError

logger = logging.getLogger("gateway.server")

# Enough descriptors for this many connections is worth asking the kernel for, even if the hard limit is
# unlimited (where the soft limit cannot be raised to "unlimited" itself).
WANTED_OPEN_FILES = 65536


class _GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose request head takes too long."""

    # None: read REQUEST_HEADER_TIMEOUT from the settings on first use (the `uvicorn --http` case).
    header_timeout: float | None = None

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()  # the first request's head is due within the timeout of connecting

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = {PEER_EXTENSION: {"client": self.client}}  # type: ignore[typeddict-unknown-key]
        self._head_begun = True
        if self._head_timer is None:
            # A later request on a kept-alive connection: its head is due within the timeout of its first
            # byte (the wait for that byte is uvicorn's keep-alive timeout).
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._head_begun = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self._timeout(), self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head is incomplete while the request before it is still answered: that answer
            # (a stream, say) is not cut short; the head gets another period once it is done.
            self._arm_head_timer()
            return
        if self._head_begun:
            message = f"the request head was not received within {self._timeout():g} s"
            body = json.dumps({"error": message}).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
        # A connection that never sent a byte is closed without an answer: nobody asked anything.
        self.transport.close()

    def _timeout(self) -> float:
        cls = type(self)
        if cls.header_timeout is None:
            from core.settings import Settings

            cls.header_timeout = Settings().request_header_timeout
        return cls.header_timeout


_protocol_requested = False


UNPROTECTED_SERVER = (
    "start the gateway with `python main.py`, or give uvicorn the gateway's protocol: "
    "`uvicorn main:app --http core.server:HeaderTimeoutProtocol` (without it nothing times out a client "
    "that never finishes its request head)"
)


def require_gateway_protocol() -> None:
    """Refuse to start unless this process's server was given the gateway's protocol, by
    `with_header_timeout` or by name. Called from the app's lifespan: uvicorn has resolved its protocol by
    then."""
    if not _protocol_requested:
        raise ConfigurationError(UNPROTECTED_SERVER)


def with_header_timeout(seconds: float) -> type[_GatewayProtocol]:
    """The protocol class to give uvicorn, with its timeout fixed."""
    global _protocol_requested
    _protocol_requested = True
    return type("HeaderTimeoutProtocol", (_GatewayProtocol,), {"header_timeout": seconds})


def __getattr__(name: str) -> type[_GatewayProtocol]:
    # `HeaderTimeoutProtocol` is looked up here, not defined at module level, so that a server asking for it
    # by name (`--http core.server:HeaderTimeoutProtocol`) is noticed; its timeout is read from the settings.
    if name == "HeaderTimeoutProtocol":
        global _protocol_requested
        _protocol_requested = True
        return _GatewayProtocol
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def raise_open_file_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit.

    Each client connection and each stream's upstream connection holds a descriptor, and many systems still
    start processes with a soft limit of 1024, which a thousand idle clients exhaust: accept() then fails
    and the gateway stops taking connections. The hard limit is the administrator's choice; the soft one is
    only a default that any process may raise up to it.
    """
    try:
        import resource
    except ImportError:  # not on POSIX: no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, wanted, exc)
