"""The gateway's own upstream client, against an upstream scripted below the HTTP level."""

import base64
import json
import time

import httpx
import pytest

from tests.scripted_upstream import ScriptedUpstream
from tests.streams import chat_body

DONE_LINE = b'{"done":true}\n'


def chunked_ndjson(lines: list[bytes]) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(line), line) for line in lines)
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        + body
        + b"0\r\n\r\n"
    )


def _answer_once_then_drop_the_next(sock, upstream):
    upstream.read(sock)
    sock.sendall(chunked_ndjson([DONE_LINE]))
    # The next request on this kept-alive connection is read, then the connection drops without an answer.
    upstream.read(sock)


def test_a_get_on_a_pooled_connection_that_died_is_retried_once(make_gateway):
    with ScriptedUpstream(_answer_once_then_drop_the_next) as upstream:
        gateway = make_gateway(ollama_url=upstream.url)
        with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as http:
            # A relayed GET: /api/version answers from the start-up probe, not by relaying.
            assert http.get("/v1/models/m").status_code == 200
            second = http.get("/v1/models/m")
    assert second.status_code == 200
    assert upstream.connections == 2
    assert len(upstream.heads) == 3  # the dropped GET went once more, on a fresh connection


def test_a_chat_ollama_received_is_never_sent_twice(make_gateway):
    with ScriptedUpstream(_answer_once_then_drop_the_next) as upstream:
        gateway = make_gateway(ollama_url=upstream.url)
        with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as http:
            assert http.post("/chat", json=chat_body()).status_code == 200
            second = http.post("/chat", json=chat_body())
    # Ollama may have started generating: sending it again could run the model twice.
    assert second.status_code == 502
    assert len(upstream.heads) == 2


def test_ollama_restarting_between_requests_goes_unnoticed(make_gateway):
    def answer_then_close_while_idle(sock, upstream):
        upstream.read(sock)
        sock.sendall(chunked_ndjson([DONE_LINE]))
        time.sleep(0.05)  # then hang up while the connection sits in the gateway's pool

    with ScriptedUpstream(answer_then_close_while_idle) as upstream:
        gateway = make_gateway(ollama_url=upstream.url)
        with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers()) as http:
            assert http.post("/chat", json=chat_body()).status_code == 200
            time.sleep(0.3)
            second = http.post("/chat", json=chat_body())
    assert second.status_code == 200
    assert upstream.connections == 2


def test_a_stream_cut_mid_line_never_hands_the_client_half_a_line(make_gateway):
    whole = json.dumps({"message": {"content": "a"}, "done": False}).encode() + b"\n"

    def cut_mid_line(sock, upstream):
        upstream.read(sock)
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        piece = whole + b'{"message":{"cont'
        sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        time.sleep(0.05)

    with ScriptedUpstream(cut_mid_line) as upstream:
        gateway = make_gateway(ollama_url=upstream.url)
        response = httpx.post(f"{gateway.url}/chat", json=chat_body(), headers=gateway.admin_headers())
    lines = [
        json.loads(line) for line in response.text.splitlines()
    ]  # every line parses, as ollama-python needs
    assert lines == [json.loads(whole), {"error": "the connection to Ollama was lost mid-stream"}]


def test_a_one_piece_answer_cut_short_does_not_look_complete(make_gateway):
    def short_body(sock, upstream):
        upstream.read(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        sock.sendall(b'{"model":"x","mess')

    with ScriptedUpstream(short_body) as upstream:
        gateway = make_gateway(ollama_url=upstream.url)
        with pytest.raises(httpx.RemoteProtocolError):
            httpx.post(
                f"{gateway.url}/chat", json=chat_body() | {"stream": False}, headers=gateway.admin_headers()
            )


def test_a_body_that_ends_with_the_connection_is_relayed_whole(make_gateway):
    lines = [json.dumps({"message": {"content": str(n)}, "done": False}).encode() + b"\n" for n in range(3)]

    def no_length_no_chunking(sock, upstream):
        upstream.read(sock)
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\nConnection: close\r\n\r\n")
        for line in [*lines, DONE_LINE]:
            sock.sendall(line)
            time.sleep(0.02)

    with ScriptedUpstream(no_length_no_chunking) as upstream:
        gateway = make_gateway(ollama_url=upstream.url)
        response = httpx.post(f"{gateway.url}/chat", json=chat_body(), headers=gateway.admin_headers())
    assert response.status_code == 200
    assert response.content == b"".join(lines) + DONE_LINE


def test_an_upstream_that_does_not_speak_http_is_502(make_gateway):
    def garbage(sock, upstream):
        upstream.read(sock)
        sock.sendall(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")

    with ScriptedUpstream(garbage) as upstream:
        gateway = make_gateway(ollama_url=upstream.url)
        response = httpx.post(f"{gateway.url}/chat", json=chat_body(), headers=gateway.admin_headers())
    assert response.status_code == 502
    assert "invalid HTTP response" in response.json()["error"]


def test_ollama_url_path_prefix_and_credentials_are_used(make_gateway):
    def record(sock, upstream):
        upstream.read(sock)
        sock.sendall(chunked_ndjson([DONE_LINE]))

    with ScriptedUpstream(record) as upstream:
        url = upstream.url.replace("http://", "http://operator:s%3Acret@") + "/ollama/"
        gateway = make_gateway(ollama_url=url)
        response = httpx.post(f"{gateway.url}/chat", json=chat_body(), headers=gateway.admin_headers())
    assert response.status_code == 200
    request_line, *header_lines = upstream.heads[0].decode().split("\r\n")
    headers = {
        name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)
    }
    assert request_line == "POST /ollama/api/chat HTTP/1.1"
    assert headers["host"] == upstream.url.removeprefix("http://")
    assert headers["authorization"] == "Basic " + base64.b64encode(b"operator:s:cret").decode()
