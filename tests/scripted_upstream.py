"""An upstream that misbehaves on purpose, below the level of HTTP libraries: a socket server whose every
connection runs a script (answer once then hang up, send garbage, ...). It records each request's head."""

import contextlib
import socket
import threading
from collections.abc import Callable

Script = Callable[[socket.socket, "ScriptedUpstream"], None]


def read_request_head(sock: socket.socket) -> bytes | None:
    """The request's head and its Content-Length body, or None if the peer closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            while len(body) < int(value):
                body += sock.recv(65536)
    return head


class ScriptedUpstream:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.heads: list[bytes] = []
        self.connections = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        # Closing a listening socket does not wake a thread blocked in accept(): poll instead.
        self._server.settimeout(0.05)
        self._closed = threading.Event()
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> "ScriptedUpstream":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._closed.set()
        self._thread.join(timeout=5)
        self._server.close()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                sock, _ = self._server.accept()
            except TimeoutError:
                continue
            sock.settimeout(None)
            self.connections += 1
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        # OSError: the gateway hung up, which is part of some scripts.
        with sock, contextlib.suppress(OSError):
            self.script(sock, self)

    def read(self, sock: socket.socket) -> bytes | None:
        head = read_request_head(sock)
        if head is not None:
            self.heads.append(head)
        return head
