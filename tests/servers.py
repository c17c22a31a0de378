"""Running the gateway for real in tests: uvicorn on a loopback port, in a background thread.

Streaming timing and disconnects only behave as in production on a real server, so the tests talk to the
gateway over TCP, with the same loop and HTTP parser `make run` uses.
"""

import asyncio
import secrets
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn
from fastapi import FastAPI
from uvicorn._compat import asyncio_run

from core.server import gateway_protocol
from core.settings import Settings
from main import create_app
from tests.databases import new_database_url

T = TypeVar("T")

START_TIMEOUT = 15.0
# Sign-in limits no test reaches: for gateways whose tests sign in (and fail to, on purpose) many times from
# 127.0.0.1. The limits themselves are tested on gateways of their own (tests/test_sign_in_limits.py).
NO_SIGN_IN_LIMITS = {
    "login_max_failures": 1_000_000,
    "login_max_failures_per_address": 1_000_000,
    "login_max_failures_per_email": 2_000_000,
    "login_max_attempts_per_address": 1_000_000,
    "login_max_concurrent_per_address": 1_000,
}


class ServerThread:
    def __init__(self, app: FastAPI, header_timeout: float = 20.0, body_timeout: float = 60.0) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            loop="uvloop",
            # The protocol `python main.py` serves with. An in-process test server stops at once: no proxy
            # is sending it requests then (the drain for proxies is tested on real processes, test_shutdown),
            # and waiting out each test client's idle connections cost the suite minutes.
            http=gateway_protocol(header_timeout, body_timeout, drain_on_shutdown=False),
            log_level="warning",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        asyncio_run(serve(), loop_factory=self.server.config.get_loop_factory())

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=START_TIMEOUT)


@dataclass
class RunningGateway:
    url: str
    settings: Settings
    app: FastAPI
    admin_email: str
    admin_password: str
    loop: asyncio.AbstractEventLoop | None = None
    _tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine on the gateway's own event loop (its services live there) and returns its
        result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def login(self, email: str, password: str) -> str:
        key = (email, password)
        if key not in self._tokens:
            response = httpx.post(f"{self.url}/login", json={"email": email, "password": password})
            response.raise_for_status()
            self._tokens[key] = response.json()["access_token"]
        return self._tokens[key]

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.login(self.admin_email, self.admin_password)}"}

    @property
    def services(self):
        return self.app.state.services


def gateway_settings(data_dir: Path, ollama_url: str, **overrides) -> Settings:
    values = {
        "ollama_url": ollama_url,
        "data_dir": data_dir,
        "admin_email": "admin@example.com",
        "admin_password": secrets.token_urlsafe(12),
        **overrides,
    }
    if "database_url" not in values:
        values["database_url"] = new_database_url()
    return Settings(_env_file=None, **values)


def start_gateway(settings: Settings) -> tuple[RunningGateway, ServerThread]:
    # No start-up probe: it would land, at a moment of its own, among the requests tests count or script at
    # their Ollama. The gateway as `python main.py` runs it does probe (tests/test_serving.py).
    app = create_app(settings, probe_ollama_at_start=False)
    server = ServerThread(app, settings.request_header_timeout, settings.request_body_timeout)
    url = server.start()
    assert settings.admin_password is not None, "the tests sign in as the configured admin"
    gateway = RunningGateway(
        url=url,
        settings=settings,
        app=app,
        admin_email=settings.admin_email,
        admin_password=settings.admin_password.get_secret_value(),
        loop=server.loop,
    )
    return gateway, server


def add_user(gateway: RunningGateway, email: str, role: str = "user") -> str:
    """A second person on the gateway; returns their token."""
    password = secrets.token_urlsafe(12)
    gateway.services.users.create(email, password, role)
    return gateway.login(email, password)
