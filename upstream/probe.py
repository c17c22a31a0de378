"""Whether Ollama answers, and its version: asked by `/health` and `/api/version` on every call, and once at
start-up.

Ollama down at start-up is normal (both often start at boot, in either order), so the gateway starts anyway;
but an operator who sees nothing and then only 502s should not have to guess: start-up says it once, as a
warning, in the background (a host that drops packets would otherwise hold the start for the probe's timeout).
The probe sends no header of any client's and waits PROBE_TIMEOUT at most, so the public routes that use it
can't be used to reach Ollama, or to hold connections to it.
"""

import asyncio
import logging
from dataclasses import dataclass

from core.errors import GatewayError
from upstream.client import Upstream

logger = logging.getLogger("gateway.upstream")

PROBE_TIMEOUT = 3.0
# What the upstream client says when Ollama could not be asked at all (upstream.client); any other status is
# Ollama's own answer.
UNREACHABLE = (502, 504)


@dataclass(frozen=True)
class OllamaProbe:
    reachable: bool
    version: str | None = None
    problem: str | None = None  # why there is no version, said without credentials


async def probe_ollama(upstream: Upstream) -> OllamaProbe:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            answer = await upstream.fetch_json("GET", "/api/version")
    except TimeoutError:
        problem = f"Ollama is not reachable: no answer from {upstream.public_url} within {PROBE_TIMEOUT:g} s"
        return OllamaProbe(reachable=False, problem=problem)
    except GatewayError as error:
        if error.status in UNREACHABLE:
            return OllamaProbe(reachable=False, problem=f"Ollama is not reachable: {error.message}")
        # A wrong base path in OLLAMA_URL, or something else than Ollama there: it answers, but not as Ollama.
        problem = f"Ollama at {upstream.public_url} answered {error.status} to /api/version ({error.message})"
        return OllamaProbe(reachable=False, problem=problem)
    version = answer.get("version") if isinstance(answer, dict) else None
    if not isinstance(version, str):
        problem = f"Ollama at {upstream.public_url} answered /api/version without a version"
        return OllamaProbe(reachable=True, problem=problem)
    return OllamaProbe(reachable=True, version=version)


async def say_whether_ollama_answers(upstream: Upstream) -> None:
    probe = await probe_ollama(upstream)
    if probe.version is None:
        logger.warning(
            "ollama-gateway: %s; starting anyway: requests that need Ollama get 502 until it answers, and "
            "/health says whether it does",
            probe.problem,
        )
