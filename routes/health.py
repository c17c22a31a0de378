"""Public status: `GET /health` (the gateway, and whether Ollama answers) and Ollama's own `/api/version`.

Neither needs a token: real Ollama serves its version to anyone, and clients ask for it to test a connection
(Open WebUI's "verify connection" among them). Both answer from the probe (upstream.probe), never by relaying
the client's request, and show no secret (not even URL credentials).
"""

from fastapi import APIRouter

from core.errors import GatewayError
from routes.dependencies import AppServices
from routes.schemas import HealthResponse, VersionResponse
from upstream.probe import probe_ollama

router = APIRouter()


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Gateway and Ollama status (no token needed)",
    tags=["health"],
)
async def health(services: AppServices) -> HealthResponse:
    probe = await probe_ollama(services.upstream)
    takers = [host for host in services.fleet.hosts if host.takes_work()]
    return HealthResponse(
        status="ok" if probe.reachable else "degraded",
        ollama_url=services.upstream.public_url,
        ollama_reachable=probe.reachable,
        ollama_version=probe.version,
        hosts=len(takers),
        hosts_in_service=sum(host.health.healthy for host in takers),
    )


_VERSION_ERRORS: dict[int | str, dict[str, str]] = {
    502: {"description": "Ollama can't be reached, or gave no version"}
}


@router.head(
    "/api/version",
    response_model=VersionResponse,
    summary="Ollama's version, headers only",
    operation_id="head_api_version",
    tags=["ollama"],
    responses=_VERSION_ERRORS,
)
@router.get(
    "/api/version",
    response_model=VersionResponse,
    summary="Ollama's version (no token needed, as in Ollama)",
    operation_id="get_api_version",
    tags=["ollama"],
    responses=_VERSION_ERRORS,
)
async def ollama_version(services: AppServices) -> VersionResponse:
    probe = await probe_ollama(services.upstream)
    if probe.version is None:
        raise GatewayError(502, probe.problem or "Ollama gave no version")
    return VersionResponse(version=probe.version)
