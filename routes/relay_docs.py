"""OpenAPI documentation for the relay endpoints, made from their routes on the app's router.

FastAPI's schema generator documents its own routes only, not Starlette routes with an ASGI endpoint, so the
entries of the relay routes (`routes.relay_endpoints`), found on the app's router, are added to the app's
schema here, from what each route carries: the same security schemes, and each surface's error shape.
"""

from typing import Any

from fastapi import FastAPI

from core.errors import OPENAI_PREFIX
from routes.relay_endpoints import Access, Body, RelayRoute, RelayRoutes

_OLLAMA_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_OPENAI_ERROR = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
_ERRORS = {
    "400": "The request is not what Ollama expects",
    "401": "Missing, invalid or expired token",
    "403": "You may not use this model, or this endpoint is for admins",
    "404": "Ollama does not have that model",
    "413": "Request body too large",
    "502": "Ollama cannot be reached",
    "504": "Ollama sent nothing within the first-byte timeout",
}
_SECURITY: list[dict[str, list[str]]] = [{"bearer": []}, {"login": []}]
# What the gateway itself requires of a body that names a model (`upstream.bodies`); the rest is Ollama's.
MODEL_BODY = {
    "type": "object",
    "description": "Ollama's own body, forwarded unchanged",
    "required": ["model"],
    "properties": {
        "model": {
            "type": "string",
            "pattern": "[!-~]",
            "description": "The model's name (older clients send it as `name`)",
        }
    },
}


def _operation(route: RelayRoute, components: dict[str, Any]) -> dict[str, Any]:
    error_schema = _OPENAI_ERROR if route.path.startswith(OPENAI_PREFIX) else _OLLAMA_ERROR
    slug = route.path_format.strip("/").replace("/", "_").replace("{", "").replace("}", "") or "root"
    operation: dict[str, Any] = {
        "summary": route.summary,
        "operationId": f"{route.method.lower()}_{slug}",
        "tags": list(route.tags),
        "security": _SECURITY,
        "responses": {
            "200": route.response_doc or {"description": "Ollama's answer, relayed unchanged"},
            **{
                status: {"description": text, "content": {"application/json": {"schema": error_schema}}}
                for status, text in _ERRORS.items()
            },
        },
    }
    if route.access is Access.ADMIN:
        operation["description"] = "For admins only: others get 403."
    if route.param is not None:
        operation["parameters"] = [
            {
                "name": route.param,
                "in": "path",
                "required": True,
                "schema": route.param_schema or {"type": "string"},
            }
        ]
    if route.request_model is not None:
        schema = route.request_model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    elif route.body is Body.JSON:
        schema = route.body_schema or (
            MODEL_BODY
            if route.body_rules.model_fields
            else {"type": "object", "description": "Ollama's own body"}
        )
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": schema}}}
    elif route.body is Body.STREAM:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
        }
    return operation


def install_relay_docs(app: FastAPI) -> None:
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            relay_routes = (
                route for entry in app.routes if isinstance(entry, RelayRoutes) for route in entry.routes
            )
            for route in relay_routes:
                operations = schema["paths"].setdefault(route.path_format, {})
                operations[route.method.lower()] = _operation(route, components)
            app.openapi_schema = schema
        return app.openapi_schema

    # Replacing the method is FastAPI's documented way to extend the schema ("Extending OpenAPI").
    app.openapi = openapi  # type: ignore[method-assign]
