"""The API docs, /docs (Swagger UI) and /redoc (ReDoc), served whole by the gateway.

In headless Chromium every request that would leave loopback is aborted, as on a LAN without internet: the
pages must still render, ask for nothing elsewhere, and break none of their Content-Security-Policy.
"""

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page, Request, Route, expect

from tests.servers import RunningGateway

DOCS_PAGES = ["/docs", "/redoc"]
LOOPBACK = "127.0.0.1"
# ReDoc 2 always adds Redocly's logo from their CDN to its menu, and hides it if it fails to load. The CSP
# refuses it, so the request never leaves the browser.
REDOC_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


@dataclass
class Offline:
    """What a page tried to reach beyond loopback, and what the browser refused or complained of."""

    left_loopback: list[str] = field(default_factory=list)
    csp_violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def assert_clean(self, refused: tuple[str, ...] = ()) -> None:
        """Nothing left loopback, and the CSP refused nothing but the `refused` URLs."""
        assert self.left_loopback == []
        assert {violation.rsplit(" ", 1)[-1] for violation in self.csp_violations} == set(refused)
        assert [error for error in self.errors if not any(url in error for url in refused)] == []


def _route(seen: Offline, route: Route) -> None:
    url = urlsplit(route.request.url)
    if url.scheme in ("data", "blob") or url.hostname == LOOPBACK:
        route.continue_()
        return
    seen.left_loopback.append(route.request.url)
    route.abort("internetdisconnected")


def _console(seen: Offline, message: ConsoleMessage) -> None:
    if message.type == "error":
        seen.errors.append(message.text)


# Reported through a binding as they happen, rather than read back at the end, so none is lost to a page that
# navigated or reloaded. Init scripts are injected by the browser itself, outside the page's CSP.
REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) =>
  window.reportViolation(`${event.effectiveDirective} blocked ${event.blockedURI || "inline"}`));
"""


@pytest.fixture
def offline(browser: Browser) -> Iterator[tuple[Page, Offline]]:
    """A fresh page on a network that ends at loopback, and what it tried and broke."""
    seen = Offline()
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.route("**/*", lambda route: _route(seen, route))
    context.expose_function("reportViolation", lambda violation: seen.csp_violations.append(violation))
    context.add_init_script(REPORT_VIOLATIONS)
    page = context.new_page()
    page.on("console", lambda message: _console(seen, message))
    page.on("pageerror", lambda error: seen.errors.append(str(error)))
    yield page, seen
    context.close()


def test_swagger_ui_renders_with_no_network_beyond_the_gateway(offline, gateway):
    page, seen = offline
    page.goto(f"{gateway.url}/docs")
    expect(page.locator('.opblock-summary-path[data-path="/login"]')).to_be_visible()
    expect(page.locator('.opblock-summary-path[data-path="/api/chat"]')).to_be_visible()
    expect(page.get_by_role("button", name="Authorize").first).to_be_visible()
    page.wait_for_load_state("networkidle")
    seen.assert_clean()


def test_redoc_renders_with_no_network_beyond_the_gateway(offline, gateway):
    page, seen = offline
    page.goto(f"{gateway.url}/redoc")
    expect(page.get_by_role("heading", name=re.compile(r"^ollama-gateway"), level=1)).to_be_visible()
    expect(page.get_by_role("heading", name="Who you are, and the models you may use")).to_be_visible()
    # The search box runs in a worker made from a blob: a CSP without worker-src blob: would stop it.
    page.get_by_placeholder("Search...").fill("password")
    expect(page.locator('[role="search"] [role="menuitem"]').first).to_be_visible()
    page.wait_for_load_state("networkidle")
    seen.assert_clean(refused=(REDOC_LOGO,))


def _try_get_me(page: Page, gateway: RunningGateway) -> Request:
    """Try it out -> Execute on GET /me; returns the request Swagger UI sent."""
    operation = page.locator("#operations-me-me_me_get")
    operation.locator(".opblock-summary-control").click()
    operation.get_by_role("button", name="Try it out").click()
    with page.expect_request(f"{gateway.url}/me") as sent:
        operation.get_by_role("button", name="Execute").click()
    response = operation.locator(".live-responses-table .response")
    expect(response.locator(".response-col_status")).to_have_text("200")
    expect(response.locator(".response-col_description")).to_contain_text(gateway.admin_email)
    return sent.value


def _authorize_dialog(page: Page) -> Locator:
    page.get_by_role("button", name="Authorize").first.click()
    return page.locator(".modal-ux")  # Swagger UI gives it no dialog role


def _close(dialog: Locator) -> None:
    dialog.locator(".close-modal").click()
    expect(dialog).to_have_count(0)


def test_authorize_with_a_token_then_try_it_out_sends_it(offline, gateway):
    page, seen = offline
    token = gateway.login(gateway.admin_email, gateway.admin_password)
    page.goto(f"{gateway.url}/docs")
    dialog = _authorize_dialog(page)
    bearer = dialog.locator(".auth-container", has_text="(http, Bearer)")
    bearer.get_by_role("textbox").fill(token)
    bearer.get_by_role("button", name="Apply credentials").click()
    expect(bearer.get_by_role("button", name="Remove authorization")).to_be_visible()
    _close(dialog)

    sent = _try_get_me(page, gateway)
    assert sent.headers["authorization"] == f"Bearer {token}"
    # The chat page's origin: Swagger UI keeps the token in memory, not next to the chat page's.
    assert token not in page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)")
    seen.assert_clean()


def test_authorize_with_the_password_form_then_try_it_out_is_signed_in(offline, gateway):
    page, seen = offline
    page.goto(f"{gateway.url}/docs")
    dialog = _authorize_dialog(page)
    login = dialog.locator(".auth-container", has_text="(OAuth2, password)")
    login.get_by_label("username:").fill(gateway.admin_email)
    login.get_by_label("password:").fill(gateway.admin_password)
    login.get_by_role("button", name="Apply given OAuth2 credentials").click()
    expect(login.get_by_role("button", name="Remove authorization")).to_be_visible()
    _close(dialog)

    sent = _try_get_me(page, gateway)
    assert sent.headers["authorization"].startswith("Bearer ")
    seen.assert_clean()


class _References(HTMLParser):
    """Every src and href in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in ("src", "href") and value]


def _references(html: str) -> list[str]:
    parser = _References()
    parser.feed(html)
    return parser.urls


def _directives(policy: str) -> dict[str, str]:
    return dict([*part.strip().split(" ", 1), ""][:2] for part in policy.split(";") if part.strip())


@pytest.mark.parametrize("path", DOCS_PAGES)
def test_a_docs_page_sends_a_strict_content_security_policy(anonymous, path):
    response = anonymous.get(path)
    assert response.status_code == 200
    policy = _directives(response.headers["content-security-policy"])
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["base-uri"] == "'none'"
    assert policy["object-src"] == "'none'"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize("path", DOCS_PAGES)
def test_a_docs_page_names_no_other_origin(anonymous, path):
    html = anonymous.get(path).text
    assert not re.search(r"https?:|//|cdn", html, re.IGNORECASE)
    assert "<script>" not in html  # inline script: the CSP would refuse it


@pytest.mark.parametrize("path", DOCS_PAGES)
def test_everything_a_docs_page_loads_is_served_by_the_gateway_without_a_token(anonymous, path):
    urls = _references(anonymous.get(path).text)
    assert any(url.startswith("/static/vendor/") for url in urls)
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        response = anonymous.get(url)
        assert response.status_code == 200, url
        assert response.headers["content-type"].split(";")[0] in {
            "text/javascript",
            "text/css",
            "image/svg+xml",
        }, url
