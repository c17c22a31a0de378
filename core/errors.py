"""Errors in each surface's own shape: Ollama's `{"error": "message"}` everywhere, except under `/v1/`, where
OpenAI's clients expect `{"error": {"message", "type", "param", "code"}}`.

Every failure a client can cause or observe is raised as `GatewayError` (or one of Starlette's HTTP
exceptions) and rendered here, so no route formats errors itself and nothing leaks a stack trace.
"""

import logging
from collections.abc import Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match
from starlette.types import Receive, Scope

from core.storage_errors import Busy, Conflict, NotFound, StorageError
from core.text import holds_a_lone_surrogate

logger = logging.getLogger("gateway.errors")

BEARER_CHALLENGE = {"WWW-Authenticate": "Bearer"}
HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
CLIENT_CLOSED_REQUEST = 499  # nginx's name for it; the client never sees it


class GatewayError(StarletteHTTPException):
    """An error answered to the client as `{"error": message}` with `status`.

    An HTTPException, so that FastAPI passes it on unchanged when it is raised while FastAPI reads a request
    body (the body cap, raised from `receive`): FastAPI turns any other exception there into a generic 400
    "There was an error parsing the body"."""

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        openai_type: str | None = None,
    ) -> None:
        super().__init__(status_code=status, detail=message, headers=headers)
        self.status = status
        self.message = message
        # The OpenAI-style surface's error `type` and `code`, where the status alone doesn't say it.
        self.openai_type = openai_type

    def __str__(self) -> str:
        return self.message


class Unauthorized(GatewayError):
    def __init__(self, message: str = "missing or invalid credentials") -> None:
        super().__init__(401, message, BEARER_CHALLENGE)


class Forbidden(GatewayError):
    def __init__(self, message: str) -> None:
        super().__init__(403, message)


OPENAI_PREFIX = "/v1/"


# As OpenAI's API says a used-up budget: its clients' users search for these.
INSUFFICIENT_QUOTA = "insufficient_quota"


def _openai_error(status: int, message: str, openai_type: str | None = None) -> dict:
    if openai_type is not None:
        kind, code = openai_type, openai_type
    elif status == 401:
        kind, code = "invalid_request_error", "invalid_api_key"
    elif status == 403:
        kind, code = "permission_error", None
    elif status == 429:
        kind, code = "requests", "rate_limit_exceeded"  # too many at once: OpenAI's rate limit
    elif status < 500:
        kind, code = "invalid_request_error", None
    else:
        kind, code = "api_error", None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def error_response(
    status: int,
    message: str,
    headers: Mapping[str, str] | None = None,
    *,
    path: str = "",
    openai_type: str | None = None,
) -> JSONResponse:
    """The error in the shape the caller's surface expects, decided by the request path."""
    body = (
        _openai_error(status, message, openai_type) if path.startswith(OPENAI_PREFIX) else {"error": message}
    )
    return JSONResponse(body, status_code=status, headers=headers)


async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
    return error_response(
        exc.status, exc.message, exc.headers, path=request.url.path, openai_type=exc.openai_type
    )


async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = exc.detail if isinstance(exc.detail, str) else "request failed"
    headers = exc.headers
    if exc.status_code == 405:
        # Starlette names only the methods of the first route that matched the path, but a path often has
        # one route per method (GET and POST /keys): Allow must list them all (RFC 9110 §15.5.6).
        headers = {**(headers or {}), "Allow": _allowed_methods(request)}
    return error_response(exc.status_code, message.lower(), headers, path=request.url.path)


def _allowed_methods(request: Request) -> str:
    """Every method some route fully matches on this path, asked of the router itself."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]
    return ", ".join(allowed)


def _describe_validation_error(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {error.get('msg')}" if where else str(error.get("msg")))
    return "; ".join(problems) or "invalid request"


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, _describe_validation_error(exc), path=request.url.path)


_STORAGE_STATUS: dict[type[StorageError], int] = {NotFound: 404, Conflict: 409, Busy: 503}


async def _storage_error(request: Request, exc: StorageError) -> JSONResponse:
    # The storage layer's own errors (core.storage_errors), said as HTTP; a route that means something more
    # particular by one (a key for an account removed meanwhile is a 401) catches it itself. A busy database
    # (one writer at a time on SQLite, a held lock on Postgres) is not the gateway broken: come back.
    status = _STORAGE_STATUS.get(type(exc), 500)
    if status == 503:
        logger.warning("database busy on %s %s: %s", request.method, request.url.path, exc)
        return error_response(
            503, "the database is busy: try again", {"Retry-After": "1"}, path=request.url.path
        )
    if status == 500:
        return await _unexpected_error(request, exc)
    return error_response(status, exc.message, path=request.url.path)


async def _unstorable_text(request: Request, exc: Exception) -> JSONResponse:
    # Text a client sent that nothing can store or hash (a lone surrogate in its JSON) is the client's error;
    # every field that takes text refuses it (core.text), and this answers for any place that could not.
    if isinstance(exc, UnicodeEncodeError) and holds_a_lone_surrogate(exc):
        logger.warning("refused text with a lone surrogate on %s %s", request.method, request.url.path)
        return error_response(400, "the request holds text that is not valid Unicode", path=request.url.path)
    return await _unexpected_error(request, exc)


async def _client_gone(request: Request, exc: Exception) -> Response:
    # The client went away while sending its body: nobody is left to read an answer, and nothing went wrong
    # in the gateway, so nothing is logged (a traceback per cut-off request would flood the log).
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # The client learns only that it failed; the details go to the log for the operator.
    logger.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal server error", path=request.url.path)


async def rendered_by_the_app(scope: Scope, receive: Receive, exc: Exception) -> Response:
    """The answer the app's handlers give `exc`, for code that runs outside FastAPI's exception middleware
    (the credentials guard, a relay endpoint called first: routes.relay_endpoints): one rendering for
    every error, wherever it was raised. Looked up as Starlette does: by status, then by class."""
    handlers = scope["app"].exception_handlers
    handler = handlers.get(exc.status_code) if isinstance(exc, StarletteHTTPException) else None
    if handler is None:
        handler = next((handlers[cls] for cls in type(exc).__mro__ if cls in handlers), None)
    if handler is None:
        raise exc
    return await handler(Request(scope, receive), exc)


def install_error_handlers(app: FastAPI) -> None:
    # Starlette types every handler as taking any Exception, though it calls each only with the class it is
    # registered for, so a handler for a subclass does not type-check (Kludex/starlette#2417).
    app.add_exception_handler(GatewayError, _gateway_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_exception)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StorageError, _storage_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _client_gone)
    app.add_exception_handler(UnicodeEncodeError, _unstorable_text)
    app.add_exception_handler(Exception, _unexpected_error)
