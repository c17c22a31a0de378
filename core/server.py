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
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.body_timeout import BYTES_PER_EXTRA_SECOND
from core.client_address import PEER_KEY
from core.settings import ConfigurationError, Settings

logger = logging.getLogger("gateway.server")

# Enough descriptors for this many connections is worth asking the kernel for, even if the hard limit is
# unlimited (where the soft limit cannot be raised to "unlimited" itself).
WANTED_OPEN_FILES = 65536


class _GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, closing connections whose request head takes too long, and those whose
    unread request body keeps trickling in after their answer was sent."""

    # None: read from the settings on first use (the `uvicorn --http` case).
    header_timeout: float | None = None
    body_timeout: float | None = None
    # Set on the instance only while a body is being dropped: a class default keeps every connection's
    # attribute dict as small as uvicorn's own (measured: a kilobyte per open stream).
    _discard_timer: asyncio.TimerHandle | None = None
    _discard_credit = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_begun = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio hands a stream protocol a Transport, as uvicorn's override says; BaseProtocol says less.
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm_head_timer()  # the first request's head is due within the timeout of connecting

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        self._stop_discarding()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope[PEER_KEY] = self.client  # type: ignore[literal-required]
        self._head_begun = True
        if self._head_timer is None:
            # A later request on a kept-alive connection: its head is due within the timeout of its first
            # byte (the wait for that byte is uvicorn's keep-alive timeout).
            self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._head_begun = False
        self._cancel_head_timer()
        super().on_headers_complete()

    # -- the head -------------------------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        self._head_timer = self.loop.call_later(self._header_timeout(), self._head_timed_out)

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
            message = f"the request head was not received within {self._header_timeout():g} s"
            body = json.dumps({"error": message}).encode()
            self.transport.write(
                b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
        # A connection that never sent a byte is closed without an answer: nobody asked anything.
        self.transport.close()

    # -- a body left unread ---------------------------------------------------------------------------------
    # Answered before its body was read (401 from the credentials check, 413, 408), a request's remaining
    # body is read and dropped by uvicorn, so the client still sees the answer (closing at once would reset
    # the connection under it). But every byte it sends would keep the connection open: it gets the same
    # allowance as any body (core.body_timeout), then the connection is closed.

    def on_response_complete(self) -> None:
        super().on_response_complete()
        cycle = self.cycle
        if cycle is not None and cycle.more_body and not self.transport.is_closing():
            self._discard_credit = 0.0
            self._discard_timer = self.loop.call_later(self._body_timeout(), self._discard_timed_out)

    def on_body(self, body: bytes) -> None:
        if self._discard_timer is not None:
            self._discard_credit += len(body) / BYTES_PER_EXTRA_SECOND
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._discard_timer is not None and not self.transport.is_closing():
            # The dropped body is over: the connection may carry the client's next request. Every byte of the
            # body cancelled uvicorn's keep-alive timer, which it only arms when an answer completes.
            self._stop_discarding()
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _discard_timed_out(self) -> None:
        if self._discard_credit > 0:
            credit = min(self._discard_credit, self._body_timeout())  # never more than the timeout in hand
            self._discard_timer = self.loop.call_later(credit, self._discard_timed_out)
            self._discard_credit = 0.0
            return
        self._discard_timer = None
        self.transport.close()

    def _stop_discarding(self) -> None:
        if self._discard_timer is not None:
            self._discard_timer.cancel()
            self._discard_timer = None

    # -- settings -------------------------------------------------------------------------------------------

    def _header_timeout(self) -> float:
        cls = type(self)
        if cls.header_timeout is None:
            cls.header_timeout = Settings().request_header_timeout
        return cls.header_timeout

    def _body_timeout(self) -> float:
        cls = type(self)
        if cls.body_timeout is None:
            cls.body_timeout = Settings().request_body_timeout
        return cls.body_timeout


_protocol_requested = False


UNPROTECTED_SERVER = (
    "start the gateway with `python main.py`, or give uvicorn the gateway's protocol: "
    "`uvicorn main:app --http core.server:HeaderTimeoutProtocol` (without it nothing times out a client "
    "that never finishes its request head)"
)


def require_gateway_protocol() -> None:
    """Refuse to start unless this process's server was given the gateway's protocol, by `gateway_protocol`
    or by name. Called from the app's lifespan: uvicorn has resolved its protocol by then."""
    if not _protocol_requested:
        raise ConfigurationError(UNPROTECTED_SERVER)


def gateway_protocol(header_timeout: float, body_timeout: float) -> type[_GatewayProtocol]:
    """The protocol class to give uvicorn, with its timeouts fixed."""
    global _protocol_requested
    _protocol_requested = True
    timeouts = {"header_timeout": header_timeout, "body_timeout": body_timeout}
    return type("HeaderTimeoutProtocol", (_GatewayProtocol,), timeouts)


def __getattr__(name: str) -> type[_GatewayProtocol]:
    # `HeaderTimeoutProtocol` is looked up here, not defined at module level, so that a server asking for it
    # by name (`--http core.server:HeaderTimeoutProtocol`) is noticed; its timeouts come from the settings.
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
