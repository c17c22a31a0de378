"""OpenAPI documentation for the relay endpoints, generated from their route table.

They are served by the pure-ASGI fast path, which FastAPI's schema generator cannot see, so their entries are
added to the app's schema here: same security schemes, same error shape as every other route.
"""

from typing import Any

from fastapi import FastAPI

from upstream.endpoints import RelayRoute

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}},
    "required": ["error"],
}
_ERROR_STATUSES = {
    "400": "The body is not what Ollama expects",
    "401": "Missing, invalid or expired token",
    "404": "Ollama does not have that model",
    "413": "Request body too large",
    "502": "Ollama cannot be reached",
    "504": "Ollama sent nothing within the first-byte timeout",
}
_SECURITY = [{"bearer": []}, {"login": []}]


def _operation(route: RelayRoute, components: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}_{route.path.strip('/').replace('/', '_') or 'root'}",
        "tags": list(route.tags),
        "security": _SECURITY,
        "responses": {
            "200": route.response_doc or {"description": "Ollama's answer, relayed unchanged"},
            **{
                status: {"description": text, "content": {"application/json": {"schema": _ERROR_SCHEMA}}}
                for status, text in _ERROR_STATUSES.items()
            },
        },
    }
    if route.request_model is not None:
        schema = route.request_model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    return operation


def install_relay_docs(app: FastAPI, routes: list[RelayRoute]) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for route in routes:
                schema["paths"].setdefault(route.path, {})[route.method.lower()] = _operation(
                    route, components
                )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
