"""An upstream that misbehaves on purpose, below the level of HTTP libraries: a socket server whose every
connection runs a script (answer once then hang up, send garbage, ...). It records each request's head."""

import contextlib
import socket
import threading
import time
from collections.abc import Callable

Script = Callable[[socket.socket, "ScriptedUpstream"], None]


def _receive_while(sock: socket.socket, data: bytes, wanting: Callable[[bytes], bool]) -> bytes | None:
    """`data` with what the peer sends for as long as `wanting(data)`; None if the peer closed first."""
    while wanting(data):
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data


def _read_chunked(sock: socket.socket, data: bytes) -> bytes | None:
    """A chunked body, given what has arrived of it so far; None if the peer closed first."""
    body = b""
    while True:
        received = _receive_while(sock, data, lambda data: b"\r\n" not in data)
        if received is None:
            return None
        size_line, _, data = received.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        received = _receive_while(sock, data, lambda data: len(data) < size + 2)  # noqa: B023 -- called now
        if received is None:
            return None
        data = received
        if size == 0:
            return body  # no trailers: the gateway sends none
        body, data = body + data[:size], data[size + 2 :]


def read_request(sock: socket.socket) -> tuple[bytes, bytes] | None:
    """The request's head and body (Content-Length or chunked), or None if the peer closed first."""
    data = _receive_while(sock, b"", lambda data: b"\r\n\r\n" not in data)
    if data is None:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
            received = _receive_while(sock, body, lambda body: len(body) < length)  # noqa: B023 -- called now
            if received is None:
                return None
            body = received
        elif name == b"transfer-encoding" and value == b"chunked":
            chunked = _read_chunked(sock, body)
            if chunked is None:
                return None
            body = chunked
    return head, body


def read_request_head(sock: socket.socket) -> bytes | None:
    """The request's head, its body read and dropped, or None if the peer closed first."""
    request = read_request(sock)
    return None if request is None else request[0]


def read_head_only(sock: socket.socket) -> bytes:
    """The request's head, leaving its body unread (some bytes of it may have come with the head); b"" if
    the peer closed first."""
    data = _receive_while(sock, b"", lambda data: b"\r\n\r\n" not in data)
    return b"" if data is None else data.partition(b"\r\n\r\n")[0]


def linger_then_close(sock: socket.socket) -> None:
    """Close as Go's net/http does after answering without reading the whole body (`closeWriteAndWait`): end
    its side first, and close 500 ms later, so the client reads the answer before the reset that unread
    bytes cause. (Closed at once, the reset can make the client's kernel or loop drop the answer unread.)"""
    sock.shutdown(socket.SHUT_WR)
    time.sleep(0.5)


def answer_each(reply: bytes, *, close_after: bool = False) -> Script:
    """A script: every request on the connection gets `reply`, exact bytes; with `close_after`, the
    connection is closed after the first one."""

    def script(sock: socket.socket, upstream: "ScriptedUpstream") -> None:
        while upstream.read(sock) is not None:
            sock.sendall(reply)
            if close_after:
                return

    return script


class ScriptedUpstream:
    def __init__(
        self, script: Script, *, receive_buffer: int | None = None, timeout: float | None = None
    ) -> None:
        """`receive_buffer`: a small socket receive buffer, so that a script that stops reading soon makes
        the gateway's writes wait. `timeout`: how long a script may block on its socket."""
        self.script = script
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.connections = 0
        self.closed_by_peer = 0  # connections the gateway closed while the script waited for a request
        self._closing = threading.Condition()
        self._timeout = timeout
        self._server = socket.create_server(("127.0.0.1", 0))
        if receive_buffer is not None:
            # Set on the listener so accepted sockets inherit it before the handshake sizes the window.
            self._server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        # Closing a listening socket does not wake a thread blocked in accept(): poll instead.
        self._server.settimeout(0.05)
        self._closed = threading.Event()
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "ScriptedUpstream":
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._server.close()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._server.accept()
            except TimeoutError:
                continue
            sock.settimeout(self._timeout)
            self.connections += 1
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        # OSError: the gateway hung up, which is part of some scripts.
        with sock, contextlib.suppress(OSError):
            self.script(sock, self)

    def read(self, sock: socket.socket) -> bytes | None:
        """The next request's head (its body is kept in `bodies`), or None if the gateway hung up."""
        try:
            request = read_request(sock)
        except OSError:  # reset rather than closed
            request = None
        if request is None:
            with self._closing:
                self.closed_by_peer += 1
                self._closing.notify_all()
            return None
        head, body = request
        self.heads.append(head)
        self.bodies.append(body)
        return head

    def wait_closed_by_peer(self, count: int, timeout: float) -> int:
        """Wait until the gateway has closed `count` connections a script was reading; the count then."""
        with self._closing:
            self._closing.wait_for(lambda: self.closed_by_peer >= count, timeout)
            return self.closed_by_peer
