"""Which headers cross the gateway, in each direction.

Toward Ollama the client's credentials never travel (Authorization, Cookie), the Host is the upstream's own
(Ollama bound to loopback answers 403 to a foreign Host; it comes from OLLAMA_URL), and the Origin is dropped:
the gateway does CORS itself, while Ollama would reject origins outside its own OLLAMA_ORIGINS. The client's
Accept-Encoding is dropped too: the upstream client asks for an uncompressed body (`Accept-Encoding:
identity`), since the relay cuts streams at line ends. Hop-by-hop headers (RFC 9110 §7.6.1) describe one
connection and never cross a proxy in either direction.

Toward the client only an allow-list passes: what Ollama sends that a client needs to read the body. The
gateway's origin is the web page's origin too, so a header from Ollama or a proxy in front of it must not set
anything there (Set-Cookie, Clear-Site-Data, Strict-Transport-Security, Alt-Svc, CORS headers), nor ask the
client for credentials (WWW-Authenticate): the gateway speaks for itself on those.
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
    b"accept-encoding",
    # The gateway's own: which host manages models, a request's priority (routes.dispatch).
    b"x-ollama-host",
    b"x-priority",
}

# Ollama sends Content-Type, and a framing the gateway replaces with its own (Content-Length or chunked);
# Content-Encoding is for a body a proxy compressed (the relay refuses compressed streams); the validators
# belong with a 304 to the client's own conditional request.
RELAYED_DOWNSTREAM = frozenset(
    {b"content-type", b"content-encoding", b"content-language", b"etag", b"last-modified"}
)


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
    """The headers of Ollama's answer that the client gets: those of RELAYED_DOWNSTREAM, lower-cased."""
    hop_by_hop = _named_in_connection(upstream_headers)
    return [
        (lowered, value)
        for name, value in upstream_headers
        if (lowered := name.lower()) in RELAYED_DOWNSTREAM and lowered not in hop_by_hop
    ]
