"""GET /models: the models Ollama has (its /api/tags list)."""

from fastapi import APIRouter

from auth.dependencies import CurrentUser
from core.services import AppServices
from routes.schemas import ModelList, errors

router = APIRouter(tags=["models"])


@router.get("/models", response_model=ModelList, responses=errors(401, 502, 504), summary="List the models")
async def list_models(_: CurrentUser, services: AppServices) -> ModelList:
    tags = await services.upstream.fetch_json("GET", "/api/tags")
    models = tags.get("models") if isinstance(tags, dict) else None
    return ModelList(models=[model for model in models or [] if isinstance(model, dict)])
