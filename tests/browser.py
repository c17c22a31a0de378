"""Driving the chat page in Debian's Chromium, headless, through Playwright (with `executable_path`: no
browser download). The test command installs Chromium with apt-get."""

import shutil
from pathlib import Path
from typing import Literal

from playwright.sync_api import Browser, Page, expect

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
# Without the networking flags Chromium keeps trying to reach Google's services, which this machine refuses.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent.parent / "test-output" / "screenshots"


def chromium_path() -> str:
    for candidate in CHROMIUM_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    found = shutil.which("chromium")
    if found:
        return found
    raise RuntimeError(
        "Chromium is not installed: run `make test`, which installs it (apt-get install chromium)"
    )


def open_page(
    browser: Browser,
    *,
    theme: Literal["light", "dark"] = "light",
    width: int = 1280,
    height: int = 800,
    answer: str | None = None,
) -> Page:
    """A fresh browser context; every confirm() is accepted and every prompt() answered with `answer`."""
    context = browser.new_context(
        viewport={"width": width, "height": height}, color_scheme=theme, accept_downloads=True
    )
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept(answer) if answer is not None else dialog.accept())
    return page


def sign_in(page: Page, url: str, email: str, password: str) -> None:
    page.goto(url)
    form = page.locator("#signin-view")
    form.get_by_label("Email").fill(email)
    form.get_by_label("Password").fill(password)
    form.get_by_role("button", name="Sign in").click()
    expect(page.get_by_label("Model", exact=True)).to_be_visible()


def send_message(page: Page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=False)
