"""One error shape for the whole gateway: Ollama's own `{"error": "message"}`.

Every failure a client can cause or observe is raised as `GatewayError` (or one of Starlette's HTTP
exceptions) and rendered by the handlers registered here, so no route formats errors itself and nothing
leaks a stack trace.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("gateway.errors")

BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}


class GatewayError(Exception):
    """An error answered to the client as `{"error": message}` with `status`."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


class Unauthorized(GatewayError):
    def __init__(self, message: str = "missing or invalid credentials") -> None:
        super().__init__(401, message, BEARER_CHALLENGE)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _gateway_error(_: Request, exc: GatewayError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.headers)


async def _http_exception(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    return error_response(exc.status_code, message.lower(), exc.headers)


def _describe_validation_error(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(problems) or "invalid request"


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, _describe_validation_error(exc))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The client learns only that it failed; the details go to the log for the operator.
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
