"""Many people at once: concurrent streams all complete, none waits on a connection pool."""

import asyncio
import json

import httpx

from tests.streams import chat_body

STREAMS = 300


async def _one_stream(http: httpx.AsyncClient, body: dict) -> list[dict]:
    async with http.stream("POST", "/chat", json=body) as response:
        assert response.status_code == 200
        return [json.loads(line) async for line in response.aiter_lines()]


async def _all_streams(url: str, headers: dict) -> list[list[dict]]:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(60, pool=None)
    body = chat_body(tokens=20, interval=0.1)  # two seconds of generation each
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=timeout) as http:
        return await asyncio.gather(*(_one_stream(http, body) for _ in range(STREAMS)))


def test_300_concurrent_two_second_streams_all_complete(gateway, ollama):
    results = asyncio.run(_all_streams(gateway.url, gateway.admin_headers()))
    assert len(results) == STREAMS
    for lines in results:
        assert len(lines) == 21
        assert lines[-1]["done"] is True
    assert len(ollama.streams) == STREAMS
