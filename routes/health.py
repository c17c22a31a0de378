"""GET /health: public liveness, and whether Ollama answers. Shows no secret (not even URL credentials)."""

import asyncio

from fastapi import APIRouter

from core.errors import GatewayError
from core.services import AppServices
from routes.schemas import HealthResponse

router = APIRouter(tags=["health"])

HEALTH_PROBE_TIMEOUT = 3.0


@router.get("/health", response_model=HealthResponse, summary="Gateway and Ollama status (no token needed)")
async def health(services: AppServices) -> HealthResponse:
    upstream = services.upstream
    try:
        async with asyncio.timeout(HEALTH_PROBE_TIMEOUT):
            answer = await upstream.fetch_json("GET", "/api/version")
        version = answer.get("version") if isinstance(answer, dict) else None
        reachable = True
    except (GatewayError, TimeoutError):
        version, reachable = None, False
    return HealthResponse(
        status="ok" if reachable else "degraded",
        ollama_url=upstream.public_url,
        ollama_reachable=reachable,
        ollama_version=version if isinstance(version, str) else None,
    )
