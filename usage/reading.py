"""What an answer says it used, read from its last bytes (the relay keeps them: `upstream.passthrough`).

Ollama's native answers carry its counters (`upstream.counters`). The OpenAI-style ones carry only token
counts, in a `usage` object: at the end of a whole answer, in the last chunk of a stream when the request
asked for it (`stream_options.include_usage`, which the gateway adds: `usage.openai`), in the closing
`response.completed` event of `/v1/responses`. JSON escapes every quote inside a string, so a quoted name
followed by a colon is a key, never text a model wrote; in the OpenAI format even a tool call's arguments
are a string.
"""

import re
from dataclasses import dataclass

_OPENAI_COUNT = re.compile(rb'"(prompt_tokens|completion_tokens|input_tokens|output_tokens)"\s*:\s*(\d+)')
_NAMES = {
    b"prompt_tokens": "prompt",
    b"input_tokens": "prompt",
    b"completion_tokens": "completion",
    b"output_tokens": "completion",
}


@dataclass(frozen=True)
class TokenCounts:
    prompt: int | None
    completion: int | None


def read_openai_usage(tail: bytes) -> TokenCounts | None:
    """The token counts of an OpenAI-style answer's `usage`, or None when its end has none."""
    found: dict[str, int] = {}
    for name, value in _OPENAI_COUNT.findall(tail):
        found[_NAMES[name]] = int(value)  # the last one given: usage comes last
    if not found:
        return None
    return TokenCounts(found.get("prompt"), found.get("completion"))


def relayed_tokens(lines: int, event_stream: bool) -> int:
    """About how many tokens a stream cut short had sent: Ollama sends one per line (an NDJSON line; an
    event, two lines with its blank one, in an event stream)."""
    return lines // 2 if event_stream else lines


def prompt_estimate(body_bytes: int) -> int:
    """About how many tokens a prompt holds when Ollama did not say: four bytes of JSON to a token."""
    return max(body_bytes // 4, 1)
