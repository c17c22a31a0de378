"""The sockets `python main.py` listens on, taken before the app starts (issue 10, item 4).

uvicorn binds only after the app's lifespan has run, and the lifespan creates the first admin and prints its
generated password: with the port already taken, the password was printed, the bind failed, and no later
start ever showed it again. Binding first makes a taken port the first thing to fail, before anything is
created.

The sockets are made the way asyncio's `create_server(host=..., port=...)` makes them, which is what uvicorn
did with HOST and PORT: one per address the host resolves to (`localhost`: 127.0.0.1 and ::1), address reuse
on, IPv6 sockets IPv6-only, and an address of a family this machine lacks skipped.
"""

import errno
import logging
import socket
from typing import Any

import uvicorn

logger = logging.getLogger("uvicorn.error")
# An address of a family this machine lacks, rather than a port that can't be had: socket() fails with
# EAFNOSUPPORT when the kernel has no IPv6 (`ipv6.disable=1`), bind() with EADDRNOTAVAIL when IPv6 is off
# (`disable_ipv6`, common in containers) and `localhost` still resolves to ::1. asyncio's create_server, which
# uvicorn used, skips such an address and listens on the others (https://bugs.python.org/issue30945).
_FAMILY_UNAVAILABLE = frozenset({errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL})


def listening_sockets(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Bound and listening, on each address of `host` this machine can have; OSError (a taken port, an
    unknown host, no address it can have) with nothing left open."""
    addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    unavailable: list[OSError] = []
    try:
        for family, kind, protocol, _, address in dict.fromkeys(addresses):
            try:
                sockets.append(_listening_socket(family, kind, protocol, address, backlog))
            except OSError as exc:
                if exc.errno not in _FAMILY_UNAVAILABLE:
                    raise
                unavailable.append(exc)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise unavailable[0]  # getaddrinfo gives at least one address or raises
    return sockets


def _listening_socket(
    family: socket.AddressFamily, kind: socket.SocketKind, protocol: int, address: Any, backlog: int
) -> socket.socket:
    sock = socket.socket(family, kind, protocol)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def cannot_listen_line(host: str, port: int, error: OSError) -> str:
    """What the gateway prints, alone, when it can't listen: `... cannot listen on 127.0.0.1:8000: address
    already in use`."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = error.strerror or str(error)
    return f"ollama-gateway: cannot listen on {where}: {reason[:1].lower()}{reason[1:]}"


class PreboundServer(uvicorn.Server):
    """uvicorn's server for sockets bound beforehand. It says where it listens once the app has started, as
    uvicorn does for the sockets it binds itself (and not for given ones, which it takes for a worker's)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and sockets:
            for sock in sockets:
                host, port = sock.getsockname()[:2]
                where = f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
                logger.info("Uvicorn running on http://%s (Press CTRL+C to quit)", where)
