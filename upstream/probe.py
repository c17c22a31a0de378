"""Whether Ollama answers, and its version: asked by `/health` on every call and once at start-up.

Ollama down at start-up is normal (both often start at boot, in either order), so the gateway starts anyway;
but an operator who sees nothing and then only 502s should not have to guess: start-up says it once, as a
warning, in the background (a host that drops packets would otherwise hold the start for the probe's timeout).
"""

import asyncio
import logging
from dataclasses import dataclass

from core.errors import GatewayError
from upstream.client import Upstream

logger = logging.getLogger("gateway.upstream")

PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class OllamaProbe:
    reachable: bool
    version: str | None = None
    problem: str | None = None  # why it is not reachable, said without credentials


async def probe_ollama(upstream: Upstream) -> OllamaProbe:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            answer = await upstream.fetch_json("GET", "/api/version")
    except GatewayError as error:
        return OllamaProbe(reachable=False, problem=error.message)
    except TimeoutError:
        return OllamaProbe(
            reachable=False, problem=f"no answer from {upstream.public_url} within {PROBE_TIMEOUT:g} s"
        )
    version = answer.get("version") if isinstance(answer, dict) else None
    return OllamaProbe(reachable=True, version=version if isinstance(version, str) else None)


async def say_whether_ollama_answers(upstream: Upstream) -> None:
    probe = await probe_ollama(upstream)
    if not probe.reachable:
        logger.warning(
            "ollama-gateway: Ollama is not reachable yet (%s); starting anyway: requests that need it get "
            "502 until it answers, and /health says whether it does",
            probe.problem,
        )
