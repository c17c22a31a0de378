"""The sockets `python main.py` takes before the app starts: one per address of HOST this machine can have,
as asyncio's create_server (and so uvicorn) takes them."""

import errno
import socket

import pytest

from core import listening

REAL_SOCKET = socket.socket


def _resolving_to(monkeypatch, *addresses: tuple[str, int]) -> None:
    """HOST resolves to `addresses` (host, port), in that order."""

    def getaddrinfo(*args, **kwargs):
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port, 0, 0))
            if ":" in host
            else (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))
            for host, port in addresses
        ]

    monkeypatch.setattr(listening.socket, "getaddrinfo", getaddrinfo)


def _without_ipv6(monkeypatch) -> list[socket.socket]:
    """A kernel booted with `ipv6.disable=1`: an IPv6 socket can't even be made. Returns the sockets made."""
    made: list[socket.socket] = []

    def make(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        made.append(REAL_SOCKET(family, *args, **kwargs))
        return made[-1]

    monkeypatch.setattr(listening.socket, "socket", make)
    return made


def _listening(host: str = "localhost") -> list[socket.socket]:
    return listening.listening_sockets(host, 0, backlog=8)


def test_listening_sockets_skip_an_address_family_the_kernel_lacks(monkeypatch):
    _resolving_to(monkeypatch, ("::1", 0), ("127.0.0.1", 0))
    _without_ipv6(monkeypatch)
    sockets = _listening()
    try:
        assert [sock.getsockname()[0] for sock in sockets] == ["127.0.0.1"]
    finally:
        for sock in sockets:
            sock.close()


def test_listening_sockets_skip_an_address_this_machine_does_not_have(monkeypatch):
    # 2001:db8::/32 is for documentation: never an address of this machine, so bind() says EADDRNOTAVAIL (or
    # socket() EAFNOSUPPORT, on a machine without IPv6), as it does for ::1 with IPv6 switched off.
    _resolving_to(monkeypatch, ("2001:db8::1", 0), ("127.0.0.1", 0))
    sockets = _listening()
    try:
        assert [sock.getsockname()[0] for sock in sockets] == ["127.0.0.1"]
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize(
    ("hosts", "reason"),
    [
        pytest.param([("::1", 0)], "address family not supported by protocol", id="no-ipv6"),
        pytest.param([("192.0.2.1", 0)], "cannot assign requested address", id="not-this-machine"),
    ],
)
def test_listening_sockets_fail_in_one_line_when_no_address_can_be_had(monkeypatch, hosts, reason):
    _resolving_to(monkeypatch, *hosts)
    _without_ipv6(monkeypatch)
    with pytest.raises(OSError) as raised:
        _listening("gpu-box")
    line = listening.cannot_listen_line("gpu-box", 8000, raised.value)
    assert line == f"ollama-gateway: cannot listen on gpu-box:8000: {reason}"


def test_listening_sockets_fail_on_a_taken_port_with_nothing_left_open(monkeypatch):
    taken = REAL_SOCKET(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    # The first address binds (a port of its own), the second is taken: the first must be closed again.
    _resolving_to(monkeypatch, ("127.0.0.1", 0), ("127.0.0.1", taken.getsockname()[1]))
    made = _without_ipv6(monkeypatch)
    try:
        with pytest.raises(OSError) as raised:
            _listening()
        assert raised.value.errno == errno.EADDRINUSE
        assert len(made) == 2
        assert all(sock.fileno() == -1 for sock in made), "closed"
    finally:
        taken.close()
