"""GET /health: public liveness, and whether Ollama answers. Shows no secret (not even URL credentials)."""

from fastapi import APIRouter

from core.services import AppServices
from routes.schemas import HealthResponse
from upstream.probe import probe_ollama

router = APIRouter(tags=["health"])


@router.get("/health", response_model=HealthResponse, summary="Gateway and Ollama status (no token needed)")
async def health(services: AppServices) -> HealthResponse:
    probe = await probe_ollama(services.upstream)
    return HealthResponse(
        status="ok" if probe.reachable else "degraded",
        ollama_url=services.upstream.public_url,
        ollama_reachable=probe.reachable,
        ollama_version=probe.version,
    )
