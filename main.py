"""ollama-gateway: the authenticated front door to a shared Ollama server.

`create_app(settings)` builds the app; `app` is the one uvicorn serves (`uvicorn main:app`).
`python main.py` starts it on HOST:PORT (127.0.0.1:8000 by default).
"""

import asyncio
import gc
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

import uvicorn
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from uvicorn.config import STARTUP_FAILURE

from core.body_limit import BodyLimitMiddleware, Cap
from core.errors import install_error_handlers
from core.listening import PreboundServer, cannot_listen_line, listening_sockets
from core.server import (
    exit_cleanly_on_sigterm,
    gateway_protocol,
    raise_open_file_limit,
    require_gateway_protocol,
)
from core.settings import MIB, ConfigurationError, Settings
from core.settings_errors import configuration_error_line, read_settings
from core.startup_errors import OneLineStartupErrors
from core.workers import require_shared_state
from observe.access_log import AccessLog, configure_access_logger
from observe.metrics import publish_fleet_gauges
from routes import admin, api_docs, audit, auth, files, health, hosts, keys, me, metrics, usage, web
from routes.guard import CredentialsFirst
from routes.ollama import RELAY_ROUTES
from routes.relay_docs import install_relay_docs
from routes.relay_endpoints import Body, RelayRoutes, RelayRoutesFirst
from services import close_services, open_services
from upstream.probe import say_whether_ollama_answers

__version__ = "0.1.0"

# Multipart framing around the file: boundaries and part headers. The file itself is capped exactly.
MULTIPART_ALLOWANCE = 1 * MIB
# The gateway's own JSON routes take a few fields; their caps keep anyone (credentials are checked first
# wherever the route allows it, but /login can't) from making it read megabytes. Passwords may be 1024
# characters, each up to 12 bytes once JSON-escaped.
SMALL_JSON_LIMIT = 64 * 1024
SMALL_JSON_LIMITS = {"/login": 16 * 1024, "/me/password": 32 * 1024, "/keys": 4 * 1024}


def create_app(settings: Settings | None = None, *, probe_ollama_at_start: bool = True) -> FastAPI:
    """`probe_ollama_at_start`: ask Ollama's version once, in the background, to warn when it is not
    reachable (upstream.probe), and check every host now and then (fleet.hosts). Tests that script every
    byte Ollama sees turn it off."""
    settings = settings or read_settings()
    configure_access_logger()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        require_gateway_protocol()
        require_shared_state(settings)  # several workers with nothing shared would multiply every limit
        raise_open_file_limit()  # before uvicorn starts accepting: one descriptor per connection
        app.state.services = await open_services(settings)
        # What start-up built (modules, SQLAlchemy's and pydantic's tables) lives as long as the process;
        # left in the collector's oldest generation, every full collection walked it again, a pause of
        # ~30 ms under load (the short requests' p99 doubled). Frozen, the collector skips it.
        gc.collect()
        gc.freeze()
        if probe_ollama_at_start:
            app.state.services.fleet.start()
        probe = (
            asyncio.create_task(say_whether_ollama_answers(app.state.services.upstream))
            if probe_ollama_at_start
            else None
        )
        gauges = asyncio.create_task(publish_fleet_gauges(app.state.services.fleet))
        try:
            yield
        finally:
            for task in (probe, gauges):
                if task is not None:
                    task.cancel()
                    with suppress(asyncio.CancelledError):
                        await task
            await close_services(app.state.services)
            gc.unfreeze()  # an app made and stopped in a longer-lived process (tests) leaves nothing pinned

    app = FastAPI(
        title="ollama-gateway",
        version=__version__,
        description="Authenticated gateway to a shared Ollama server. Log in with POST /login, then send "
        "`Authorization: Bearer <token>`.",
        lifespan=lifespan,
        # FastAPI's docs pages load their scripts from a CDN; routes.api_docs serves them from here.
        docs_url=None,
        redoc_url=None,
        # No OpenTelemetry is configured; left on, FastAPI looks for providers on every request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_error_handlers(app)
    relay_routes = RelayRoutes(RELAY_ROUTES)
    # Middleware added last runs first: the access log, CORS, credentials, the body cap, the relay endpoints,
    # then the router.
    app.add_middleware(RelayRoutesFirst, routes=relay_routes)
    # (Request heads and bodies are timed by the gateway's protocol, core.server.)
    app.add_middleware(
        BodyLimitMiddleware,
        default_limit=SMALL_JSON_LIMIT,
        limits={
            **dict.fromkeys(
                (route.path for route in RELAY_ROUTES if route.body is Body.JSON),
                Cap(settings.max_request_bytes, in_mib=True),
            ),
            "/upload": Cap(
                settings.max_upload_bytes + MULTIPART_ALLOWANCE,
                "file",
                shown_limit=settings.max_upload_bytes,
                in_mib=True,
            ),
            **SMALL_JSON_LIMITS,
        },
        prefix_limits={"/admin/": SMALL_JSON_LIMIT},
        # Blobs are streamed to Ollama as they arrive, never held, so any size may pass.
        unlimited_prefixes=("/api/blobs/",),
    )
    app.add_middleware(CredentialsFirst)
    if settings.cors_origins:
        # Bearer tokens travel in a header, not a cookie: no credentials mode, so no wildcard risk.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE", "HEAD", "OPTIONS"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=["WWW-Authenticate", "Content-Disposition"],
            max_age=600,
        )
    app.add_middleware(OneLineStartupErrors)
    # Outermost: the request id and the access log see every request, refused or not.
    app.add_middleware(AccessLog, log_format=settings.log_format, trusted_proxies=settings.trusted_proxies)
    # First: the router tries its entries in order, and the relay routes carry nearly all of the traffic.
    app.router.routes.insert(0, relay_routes)
    for module in (web, api_docs, auth, me, keys, files, admin, hosts, audit, usage, health, metrics):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=web.STATIC_DIR), name="static")
    install_relay_docs(app)
    return app


def serve() -> None:
    """`make run`: take HOST:PORT, then serve. A configuration mistake or a port that can't be had is one
    line and a non-zero exit, never a traceback."""
    try:
        settings = read_settings()
    except ConfigurationError as exc:
        sys.exit(configuration_error_line(exc))
    config = uvicorn.Config(
        "main:app",
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http=gateway_protocol(settings.request_header_timeout, settings.request_body_timeout),
        # The gateway reads X-Forwarded-For itself, and only from TRUSTED_PROXIES (core.client_address).
        proxy_headers=False,
        # The gateway writes its own access log (observe.access_log), with the request id and the caller.
        access_log=False,
        # Annotated as int, but uvicorn only hands it to asyncio.wait_for, which takes seconds as a float.
        timeout_graceful_shutdown=settings.graceful_shutdown_seconds,  # type: ignore[arg-type]
    )
    try:
        # Before the app starts: its lifespan creates the first admin and prints its password
        # (core.listening).
        sockets = listening_sockets(settings.host, settings.port, config.backlog)
    except OSError as exc:
        sys.exit(cannot_listen_line(settings.host, settings.port, exc))
    server = PreboundServer(config)
    exit_cleanly_on_sigterm()
    # What uvicorn.run does around Server.run: Ctrl+C ends it quietly, and a start that failed (the app's
    # lifespan refused, say) exits non-zero.
    with suppress(KeyboardInterrupt):
        server.run(sockets=sockets)
    if not server.started:
        sys.exit(STARTUP_FAILURE)


if __name__ == "__main__":
    serve()
else:
    # Imported by uvicorn (`uvicorn main:app`) or by a test. A mistake in the settings ends the process here,
    # in one line: uvicorn would print the traceback of a failed import.
    try:
        app = create_app()
    except ConfigurationError as exc:
        sys.exit(configuration_error_line(exc))
