"""Raw HTTP/1.1 over a socket, for requests an HTTP client library would tidy up or refuse to send:
paths with dot segments exactly as written, and bodies the server may refuse half-way."""

import json
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass
class RawResponse:
    status_code: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def _address(base_url: str) -> tuple[str, int]:
    parts = urlsplit(base_url)
    assert parts.hostname is not None and parts.port is not None, base_url
    return parts.hostname, parts.port


def receive_until(sock: socket.socket, marker: bytes) -> bytes:
    """What the socket sends until `marker` has arrived (or the peer closes)."""
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_response(sock: socket.socket) -> RawResponse:
    data = receive_until(sock, b"\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return RawResponse(int(status_line.split()[1]), headers, body[:length])


def get(base_url: str, raw_path: str, headers: dict[str, str]) -> RawResponse:
    host, port = _address(base_url)
    lines = [f"GET {raw_path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        return read_response(sock)


def open_request(base_url: str, method: str, path: str, headers: dict[str, str]) -> socket.socket:
    """Send a request's head only; the caller writes the body and reads the answer."""
    host, port = _address(base_url)
    sock = socket.create_connection((host, port), timeout=10)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def open_post(base_url: str, path: str, headers: dict[str, str]) -> socket.socket:
    """Send a POST's head only; the caller writes the body and reads the answer."""
    return open_request(base_url, "POST", path, headers)


def read_status(sock: socket.socket) -> int:
    """The status of the answer, read from its status line alone (a HEAD answer's promised body never
    comes)."""
    return int(receive_until(sock, b"\r\n").split(b" ", 2)[1])
