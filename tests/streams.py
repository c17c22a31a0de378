"""Helpers for reading the gateway's NDJSON streams the way Ollama's clients do."""

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


def chat_body(model: str = "llama3.2:1b", text: str = "Hi", **options) -> dict:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": text}]}
    if options:
        body["options"] = {f"fake_{name}": value for name, value in options.items()}
    return body


@dataclass
class TimedStream:
    status: int
    headers: httpx.Headers
    lines: list[dict] = field(default_factory=list)
    arrived_at: list[float] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(line.get("message", {}).get("content", "") for line in self.lines)


def read_stream(client: httpx.Client, path: str, body: dict) -> TimedStream:
    """Every line parsed as JSON, as ollama-python does (a blank line would fail here, as it fails there)."""
    with client.stream("POST", path, json=body) as response:
        stream = TimedStream(response.status_code, response.headers)
        for line in response.iter_lines():
            stream.lines.append(json.loads(line))
            stream.arrived_at.append(time.monotonic())
    return stream
