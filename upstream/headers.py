"""Which headers cross the gateway, in each direction.

Toward Ollama the client's credentials never travel (Authorization, Cookie), the Host is the upstream's own
(Ollama bound to loopback answers 403 to a foreign Host; it comes from OLLAMA_URL), and the Origin is dropped:
the gateway does CORS itself, while Ollama would reject origins outside its own OLLAMA_ORIGINS.
Hop-by-hop headers (RFC 9110 §7.6.1) describe one connection and never cross a proxy in either direction.
"""

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

_NOT_FORWARDED_UPSTREAM = HOP_BY_HOP | {
    b"host",
    b"authorization",
    b"cookie",
    b"origin",
    b"content-length",
    b"expect",
}

# The gateway frames the body itself (chunked) and uvicorn stamps its own Date.
_NOT_RELAYED_DOWNSTREAM = HOP_BY_HOP | {b"content-length", b"date", b"server"}


def _named_in_connection(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    """Headers a sender listed in `Connection`, which are hop-by-hop too."""
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return named


def upstream_request_headers(client_headers: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The client's headers fit to forward. uvicorn's parser already refuses CR and LF in header values; a
    value holding one is dropped here all the same, since these lines are written into Ollama's request."""
    dropped = _NOT_FORWARDED_UPSTREAM | _named_in_connection(client_headers)
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in client_headers
        if name.lower() not in dropped and b"\r" not in value and b"\n" not in value
    ]


def downstream_response_headers(upstream_headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    dropped = _NOT_RELAYED_DOWNSTREAM | _named_in_connection(upstream_headers)
    return [(name.lower(), value) for name, value in upstream_headers if name.lower() not in dropped]
