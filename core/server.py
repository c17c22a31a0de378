"""How the gateway's process serves HTTP: uvicorn's httptools protocol with request-head and request-body
timeouts, and an open-file limit fit for many connections.

uvicorn times out idle kept-alive connections (`timeout_keep_alive`), but not a client that connects and
sends nothing, or sends its request head or its body a byte at a time: each such connection holds a socket
and a file descriptor for as long as the client likes, and a few hundred of them exhaust the process. The
protocol below closes a connection whose request head is not complete within REQUEST_HEADER_TIMEOUT
seconds, and one whose body falls behind REQUEST_BODY_TIMEOUT (at the transport, where it costs a timer per
request and nothing per request of the app).

The protocol also keeps the TCP peer's address in the request scope (`core.client_address`): uvicorn's own
proxy-header handling, on by default for 127.0.0.1, would otherwise replace it with whatever a client wrote
in `X-Forwarded-For`.

`python main.py` uses it. With uvicorn's own command line, pass it as
`uvicorn main:app --http core.server:HeaderTimeoutProtocol` (it then reads its timeouts from the settings
itself). The app refuses to start under a server that was not given it (`require_gateway_protocol`):
nothing else would time out a client that never finishes its request.
"""

import asyncio
import json
import logging
import signal
from types import FrameType
from typing import Any, NoReturn

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from core.client_address import PEER_KEY
from core.settings import ConfigurationError, Settings

logger = logging.getLogger("gateway.server")

# The floor under which a request body is cut off: far below any network people use, far above a deliberate
# trickle (see the body timer below).
BYTES_PER_EXTRA_SECOND = 16 * 1024

# Enough descriptors for this many connections is worth asking the kernel for, even if the hard limit is
# unlimited (where the soft limit cannot be raised to "unlimited" itself).
WANTED_OPEN_FILES = 65536


class _GatewayProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a time limit on every request's head and on its body."""

    # None: read from the settings on first use (the `uvicorn --http` case).
    header_timeout: float | None = None
    body_timeout: float | None = None
    # Set on the instance only while a body is due: class defaults keep every connection's attribute dict as
    # small as uvicorn's own (measured: a kilobyte per open stream).
    _body_timer: asyncio.TimerHandle | None = None
    _body_deadline = 0.0
    # Set once the server stops, on a connection that was idle then (`shutdown`).
    _draining = False
    # Whether idle connections wait for a request on its way when the server stops (`shutdown`).
    drain_on_shutdown = True

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
        self._stop_body_timer()
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
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered, with `Connection: close`, then the connection ends
        self._arm_body_timer()

    def shutdown(self) -> None:
        """The server stops. A connection answering a request finishes it, as uvicorn does. One idle
        between requests is not closed at once, as uvicorn would: a proxy keeping connections to the
        gateway alive (nginx) may be sending its next request on it at this very moment, and a request
        that meets a closed connection fails with no answer, a POST without being tried elsewhere (nginx
        resends only what it knows was not sent). So it stays open for the keep-alive timeout: the proxy
        closes it first (its own keep-alive timeout must be the shorter, as deploy/ has it), or a request
        that was on its way is answered, with `Connection: close`. Then it is closed."""
        if not self.drain_on_shutdown or (self.cycle is not None and not self.cycle.response_complete):
            super().shutdown()
            return
        if not self._draining:
            self._draining = True
            self.loop.call_later(self.timeout_keep_alive, self._end_drain)

    def _end_drain(self) -> None:
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()

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
            self._answer_408(f"the request head was not received within {self._header_timeout():g} s")
        # A connection that never sent a byte is closed without an answer: nobody asked anything.
        self.transport.close()

    # -- the body -------------------------------------------------------------------------------------------
    # A request's body is due within REQUEST_BODY_TIMEOUT of its head, plus a second per
    # BYTES_PER_EXTRA_SECOND received, never more than the timeout in hand: an upload at that rate or faster
    # always finishes, however large; a trickle, or a stall, is cut off. Only the client's slowness counts:
    # while uvicorn has stopped reading because the app is slow to take the body (a blob streamed to a busy
    # Ollama), the clock waits. Past the limit: 408 if nothing was answered yet, and the connection is closed
    # (the app sees its client gone). A body answered before it was read (401, 413) is read and dropped by
    # uvicorn under the same clock, so the client still sees the answer but can't keep the connection by
    # trickling.

    def _arm_body_timer(self) -> None:
        self._stop_body_timer()
        self._body_deadline = self.loop.time() + self._body_timeout()
        self._body_timer = self.loop.call_at(self._body_deadline, self._body_timed_out)

    def on_body(self, body: bytes) -> None:
        if self._body_timer is not None:
            earned = self._body_deadline + len(body) / BYTES_PER_EXTRA_SECOND
            self._body_deadline = min(earned, self.loop.time() + self._body_timeout())
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._stop_body_timer()
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and not self.transport.is_closing():
            # A body dropped after its answer is over: the connection may carry the client's next request.
            # Each of its bytes cancelled uvicorn's keep-alive timer, armed only when an answer completes.
            self._unset_keepalive_if_required()
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:
            self._body_deadline = now + self._body_timeout()  # the gateway is the slow one: a new period
        if self._body_deadline > now:
            self._body_timer = self.loop.call_at(self._body_deadline, self._body_timed_out)
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_started:
            self._answer_408(
                f"the request body did not arrive in time ({self._body_timeout():g} s, plus 1 s per "
                f"{BYTES_PER_EXTRA_SECOND // 1024} KB received)"
            )
        self.transport.close()

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _answer_408(self, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
        )

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
    "that never finishes its request head or body)"
)


def require_gateway_protocol() -> None:
    """Refuse to start unless this process's server was given the gateway's protocol, by `gateway_protocol`
    or by name. Called from the app's lifespan: uvicorn has resolved its protocol by then."""
    if not _protocol_requested:
        raise ConfigurationError(UNPROTECTED_SERVER)


def gateway_protocol(
    header_timeout: float, body_timeout: float, *, drain_on_shutdown: bool = True
) -> type[_GatewayProtocol]:
    """The protocol class to give uvicorn, with its timeouts fixed; `drain_on_shutdown`: whether idle
    connections wait for a request on its way when the server stops (`_GatewayProtocol.shutdown`)."""
    global _protocol_requested
    _protocol_requested = True
    attributes = {
        "header_timeout": header_timeout,
        "body_timeout": body_timeout,
        "drain_on_shutdown": drain_on_shutdown,
    }
    return type("HeaderTimeoutProtocol", (_GatewayProtocol,), attributes)


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


def exit_cleanly_on_sigterm() -> None:
    """SIGTERM is how a service is stopped (systemctl, docker, `kill`), and uvicorn shuts down gracefully on
    it; but then it raises the signal again for the handler it found, and with the default one the process
    dies by it: `make run` said "Terminated" and the exit status was 143 after a shutdown that went as
    planned. With this handler installed before uvicorn runs, that last step exits with status 0."""
    signal.signal(signal.SIGTERM, _stopped_by_sigterm)


def _stopped_by_sigterm(signum: int, frame: FrameType | None) -> NoReturn:
    raise SystemExit(0)
