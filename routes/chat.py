"""POST /chat: Ollama's /api/chat, relayed line for line."""

from fastapi import APIRouter, Request
from fastapi.responses import Response

from auth.dependencies import CurrentUser
from core.services import AppServices
from routes.schemas import ChatRequest, errors
from upstream.bodies import check_chat_body
from upstream.headers import upstream_request_headers
from upstream.relay import relay

router = APIRouter(tags=["chat"])

_CHAT_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": ChatRequest.model_json_schema()}},
    },
    "responses": {
        "200": {
            "description": "NDJSON stream of chat chunks, the last with done:true "
            "(or one JSON object when stream is false)",
            "content": {"application/x-ndjson": {}, "application/json": {}},
        }
    },
}


@router.post(
    "/chat",
    responses=errors(400, 401, 404, 413, 502, 504),
    openapi_extra=_CHAT_DOC,
    response_class=Response,
    summary="Chat with a model (Ollama's /api/chat body, streamed back as NDJSON)",
)
async def chat(request: Request, _: CurrentUser, services: AppServices) -> Response:
    body = await request.body()
    check_chat_body(body)
    headers = upstream_request_headers(request.scope["headers"])
    return await relay(services.upstream, "POST", "/api/chat", headers=headers, body=body)
