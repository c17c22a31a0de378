"""The endpoints that relay straight to Ollama, served by the fast path in `upstream.endpoints`."""

from routes.schemas import ChatRequest
from upstream.bodies import check_chat_body
from upstream.endpoints import RelayRoute

NDJSON_STREAM = {
    "description": "NDJSON stream of chunks, the last with done:true (one JSON object when stream is false). "
    'If Ollama fails mid-stream, the last line is {"error": "..."}.',
    "content": {"application/x-ndjson": {}, "application/json": {}},
}

RELAY_ROUTES = [
    RelayRoute(
        "POST",
        "/chat",
        "/api/chat",
        summary="Chat with a model (Ollama's /api/chat body, streamed back as NDJSON)",
        check_body=check_chat_body,
        request_model=ChatRequest,
        response_doc=NDJSON_STREAM,
        tags=("chat",),
    ),
]
