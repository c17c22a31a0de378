"""Shared fixtures: one fake Ollama for the session, gateways built from their own settings."""

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from tests import databases
from tests.browser import CHROMIUM_ARGS, chromium_path, open_page
from tests.fake_ollama import FakeOllama
from tests.processes import free_port
from tests.redis_server import KeySpace, RedisForTests
from tests.servers import NO_SIGN_IN_LIMITS, RunningGateway, ServerThread, gateway_settings, start_gateway


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--database",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the database every test gateway uses: SQLite in its DATA_DIR, or a schema of its own in a "
        "throwaway Postgres database (see tests/databases.py; `make test` runs the storage tests on both)",
    )


def pytest_configure(config: pytest.Config) -> None:
    databases.start(config.getoption("--database"))


def pytest_unconfigure(config: pytest.Config) -> None:
    databases.end()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if databases.on_postgres():
        skip, reason = "sqlite_only", "about SQLite itself (its file, its locks, its older schemas)"
    else:
        skip, reason = (
            "postgres_only",
            "needs Postgres: runs in make test's Postgres pass (--database=postgresql)",
        )
    for item in items:
        if item.get_closest_marker(skip):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def fake_ollama_server() -> Iterator[FakeOllama]:
    server = FakeOllama().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisForTests]:
    """The run's real Redis (tests/redis_server.py): TEST_REDIS_URL, 127.0.0.1:6379, or a throwaway one."""
    server = RedisForTests()
    yield server
    server.stop()


@pytest.fixture
def redis_keys(redis_server: RedisForTests) -> Iterator[KeySpace]:
    """A key prefix of the test's own on the run's Redis (`.url`, `.prefix`); its keys deleted after it."""
    space = redis_server.key_space()
    yield space
    space.clear()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Chromium, one per test module. Not one per session: while Playwright's sync API runs, an
    asyncio loop counts as running on the main thread, and every later test that calls asyncio.run() fails."""
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh page of the module's browser, closed after the test."""
    page = open_page(browser)
    yield page
    page.context.close()


@pytest.fixture
def ollama(fake_ollama_server: FakeOllama) -> FakeOllama:
    """The fake Ollama, with nothing recorded and default behaviour."""
    fake_ollama_server.reset()
    return fake_ollama_server


@pytest.fixture(scope="session")
def shared_gateway(
    fake_ollama_server: FakeOllama, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningGateway]:
    settings = gateway_settings(
        tmp_path_factory.mktemp("gateway"), fake_ollama_server.url, **NO_SIGN_IN_LIMITS
    )
    gateway, server = start_gateway(settings)
    yield gateway
    server.stop()


@pytest.fixture
def gateway(shared_gateway: RunningGateway, ollama: FakeOllama) -> RunningGateway:
    """A gateway in front of the (reset) fake Ollama, with default settings."""
    return shared_gateway


@pytest.fixture
def make_gateway(tmp_path: Path, fake_ollama_server: FakeOllama) -> Iterator[Callable[..., RunningGateway]]:
    """Build a gateway with its own settings, e.g. `make_gateway(upstream_idle_timeout=0.5)`."""
    servers: list[ServerThread] = []

    def make(**overrides) -> RunningGateway:
        overrides.setdefault("ollama_url", fake_ollama_server.url)
        data_dir = overrides.pop("data_dir", tmp_path / f"gateway-{len(servers)}")
        gateway, server = start_gateway(gateway_settings(data_dir, **overrides))
        servers.append(server)
        return gateway

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def make_fake() -> Iterator[Callable[..., FakeOllama]]:
    """A fake Ollama of the test's own, e.g. `make_fake(num_parallel=1)`, stopped after the test."""
    fakes: list[FakeOllama] = []

    def make(**settings: Any) -> FakeOllama:
        fake = FakeOllama(**settings).start()
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.stop()


@pytest.fixture
def client(gateway: RunningGateway) -> Iterator[httpx.Client]:
    """An HTTP client on the shared gateway, authenticated as its admin."""
    with httpx.Client(base_url=gateway.url, headers=gateway.admin_headers(), timeout=30) as http:
        yield http


@pytest.fixture
def anonymous(gateway: RunningGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, timeout=30) as http:
        yield http


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on: an Ollama that is down."""
    return free_port()
