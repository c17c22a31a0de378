"""The web page's Usage view, end to end in headless Chromium: charts and tables from requests really made
through the gateway to the fake Ollama, the quota's meters, everyone's use for admins, the CSV download."""

import csv
import io
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.browser import open_page, screenshot, sign_in
from usage.records import Outcome, UsageRecord

pytestmark = pytest.mark.storage

USER = "user@example.com"
PASSWORD = "users-long-password"
MARKUP_MODEL = '<img src=x onerror="window.pwned=1">:latest'  # Ollama's names carry a tag


@pytest.fixture
def web(make_gateway, ollama):
    gateway = make_gateway()
    gateway.services.users.create(USER, PASSWORD, "user", ["llama3.2:1b"])
    return gateway


def chat(web, email: str, password: str, model: str = "llama3.2:1b", text: str = "Hello there") -> None:
    response = httpx.post(
        f"{web.url}/api/chat",
        headers={"Authorization": f"Bearer {web.login(email, password)}"},
        json={"model": model, "messages": [{"role": "user", "content": text}], "stream": False},
        timeout=30,
    )
    assert response.status_code == 200, response.text


def my_usage(web, email: str, password: str, group_by: str) -> dict:
    response = httpx.get(
        f"{web.url}/me/usage",
        params={"group_by": group_by},
        headers={"Authorization": f"Bearer {web.login(email, password)}"},
    )
    response.raise_for_status()
    return response.json()


def open_usage(page: Page) -> None:
    page.get_by_role("button", name="Usage", exact=True).click()
    expect(page.locator("#usage-tables table").first).to_be_visible()


def table_rows(page: Page, caption: str) -> list[list[str]]:
    table = page.locator("#usage-tables").get_by_role("table", name=caption, exact=True)
    return [row.locator("td").all_inner_texts() for row in table.locator("tbody tr").all()]


def seconds(value: float) -> str:
    """Slot time as the page writes it below ten seconds (usage.js `duration`)."""
    return f"{float(f'{value:.2f}'):g} s"


def test_usage_view_charts_and_tables_match_the_api(page, web, ollama):
    for text in ("One", "Two and a bit more", "Three"):
        chat(web, USER, PASSWORD, text=text)
    sign_in(page, web.url, USER, PASSWORD)
    open_usage(page)

    per_model = my_usage(web, USER, PASSWORD, "model")["rows"]
    assert [row["model"] for row in per_model] == ["llama3.2:1b"]
    figures = per_model[0]
    assert table_rows(page, "Your use per model") == [
        [
            "llama3.2:1b",
            "3",
            f"{figures['prompt_tokens']:,}",
            f"{figures['completion_tokens']:,}",
            seconds(figures["slot_seconds"]),
            "0",
            "0",
        ]
    ]
    # Both charts have a bar for today, whose tooltip says the day's figures.
    (today,) = my_usage(web, USER, PASSWORD, "day")["rows"]
    tokens = page.get_by_role("img", name="Tokens per day")
    slot_time = page.get_by_role("img", name="Slot time per day")
    expect(tokens.locator(".bar rect")).to_have_count(2)  # prompt and completion, stacked
    expect(slot_time.locator(".bar rect")).to_have_count(1)
    expect(tokens.locator(".bar title").last).to_have_text(
        f"{today['day']}: Prompt tokens: {today['prompt_tokens']:,}, "
        f"Completion tokens: {today['completion_tokens']:,}"
    )
    assert tokens.locator(".bar").count() == 7  # one per day of the last 7, empty ones included
    page.locator("summary", has_text="The days as a table").click()
    assert table_rows(page, "Use per day")[0][:2] == [today["day"], "3"]
    expect(page.locator("#usage-quota")).to_be_hidden()
    expect(page.locator("#usage-scope-field")).to_be_hidden()


def test_the_quota_meters_appear_once_an_admin_sets_a_quota(page, web, ollama):
    chat(web, USER, PASSWORD)
    person = web.services.users.find_by_email(USER)
    response = httpx.patch(
        f"{web.url}/admin/users/{person.id}",
        headers=web.admin_headers(),
        json={"quota": {"period": "day", "tokens": 1000, "requests": 4}},
    )
    response.raise_for_status()
    sign_in(page, web.url, USER, PASSWORD)
    open_usage(page)
    quota = my_usage(web, USER, PASSWORD, "model")["quota"]
    box = page.locator("#usage-quota")
    expect(box).to_be_visible()
    expect(box).to_contain_text("Per day; the counts start again on")
    requests = page.get_by_role("meter", name="Requests")
    expect(requests).to_have_attribute("value", "1")
    expect(requests).to_have_attribute("max", "4")
    expect(box).to_contain_text("1 of 4 (25%)")
    used = quota["used"]["tokens"]
    expect(page.get_by_role("meter", name="Tokens")).to_have_attribute("value", str(used))
    expect(box).to_contain_text(f"{used:,} of 1,000")
    expect(page.get_by_role("meter", name="Slot time")).to_have_count(0)  # no limit on it


def test_an_admin_sets_and_removes_a_quota_in_the_users_view(browser, page, web, ollama):
    chat(web, USER, PASSWORD)
    sign_in(page, web.url, web.admin_email, web.admin_password)
    page.get_by_role("button", name="Users").click()
    form = page.locator("#quota-form")
    form.get_by_label("Person").select_option(label=USER)
    form.get_by_label("Period").select_option("day")
    form.get_by_label("Tokens").fill("5000")
    form.get_by_label("Requests").fill("10")
    form.get_by_role("button", name="Set quota").click()
    row = page.locator("#user-rows tr", has_text=USER)
    expect(row).to_contain_text("per day: 5,000 tokens, 10 requests")
    stored = web.services.users.find_by_email(USER).quota
    assert stored == {"period": "day", "tokens": 5000, "slot_seconds": None, "requests": 10}

    person = open_page(browser)
    try:
        sign_in(person, web.url, USER, PASSWORD)
        open_usage(person)
        expect(person.get_by_role("meter", name="Requests")).to_have_attribute("max", "10")
        expect(person.locator("#usage-quota")).to_contain_text("1 of 10 (10%)")
    finally:
        person.context.close()

    # Picking the person again shows their quota as it stands; removing it lifts every limit.
    expect(form.get_by_label("Tokens")).to_have_value("5000")
    form.get_by_label("Tokens").fill("")
    form.get_by_label("Requests").fill("")
    form.get_by_role("button", name="Set quota").click()
    expect(page.locator("#users-error")).to_have_text("Set at least one limit, or remove the quota.")
    form.get_by_role("button", name="Remove quota").click()
    expect(row).to_contain_text("none")
    assert web.services.users.find_by_email(USER).quota is None


def test_an_admin_sees_everyones_use_by_person_and_downloads_the_csv(page, web, ollama):
    chat(web, USER, PASSWORD)
    chat(web, USER, PASSWORD)
    chat(web, web.admin_email, web.admin_password, model="llava:7b")
    sign_in(page, web.url, web.admin_email, web.admin_password)
    open_usage(page)
    assert [row[0] for row in table_rows(page, "Your use per model")] == ["llava:7b"]

    page.get_by_label("Whose").select_option("everyone")
    expect(page.locator("caption", has_text="Use per person")).to_have_count(2)
    people = {row[0]: row[1] for row in table_rows(page, "Use per person")}
    assert people == {web.admin_email: "1", USER: "2"}
    models = {row[0]: row[1] for row in table_rows(page, "Everyone's use per model")}
    assert models == {"llama3.2:1b": "2", "llava:7b": "1"}
    pairs = [row[:3] for row in table_rows(page, "Use per person and model")]
    assert sorted(pairs) == [[web.admin_email, "llava:7b", "1"], [USER, "llama3.2:1b", "2"]]

    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    assert download.value.suggested_filename.startswith("usage-everyone-from-")
    rows = list(csv.DictReader(io.StringIO(download.value.path().read_text())))
    assert sorted((row["email"], row["model"], row["requests"]) for row in rows) == [
        (web.admin_email, "llava:7b", "1"),
        (USER, "llama3.2:1b", "2"),
    ]
    assert all(row["day"] for row in rows)


def test_a_person_without_admin_rights_downloads_their_own_csv(page, web, ollama):
    chat(web, USER, PASSWORD)
    sign_in(page, web.url, USER, PASSWORD)
    open_usage(page)
    with page.expect_download() as download:
        page.get_by_role("button", name="Download CSV").click()
    rows = list(csv.DictReader(io.StringIO(download.value.path().read_text())))
    assert [(row["model"], row["requests"]) for row in rows] == [("llama3.2:1b", "1")]


def test_a_model_name_with_markup_is_shown_as_text(page, web, ollama):
    ollama.models.append(dict(ollama.models[0], name=MARKUP_MODEL, model=MARKUP_MODEL))
    chat(web, web.admin_email, web.admin_password, model=MARKUP_MODEL)
    sign_in(page, web.url, web.admin_email, web.admin_password)
    open_usage(page)
    page.get_by_label("Whose").select_option("everyone")
    expect(page.locator("caption", has_text="Use per person")).to_have_count(2)
    assert [row[0] for row in table_rows(page, "Everyone's use per model")] == [MARKUP_MODEL]
    assert table_rows(page, "Use per person and model")[0][1] == MARKUP_MODEL
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    assert page.locator("#usage-view img").count() == 0


def past_week(web, user_id: int, model: str) -> None:
    """A week of earlier records, stored as the gateway stores its own, so that the screenshots show more than
    today's bar (the fake Ollama's requests all happen now)."""
    now = datetime.now(UTC)
    records = [
        UsageRecord(
            at=now - timedelta(days=days),
            user_id=user_id,
            key_id=None,
            surface="/api/chat",
            model=model,
            band="interactive",
            outcome=Outcome.COMPLETED,
            status=200,
            host="env-1",
            prompt_tokens=40 * days + 25,
            completion_tokens=90 + 35 * (days % 3),
            slot_seconds=1.5 + 0.4 * days,
        )
        for days in range(1, 7)
        if days != 4
    ]
    web.services.usage_store.add_all(records)


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_usage_screenshots(browser, web, ollama, theme):
    person = web.services.users.find_by_email(USER)
    admin = web.services.users.find_by_email(web.admin_email)
    httpx.patch(
        f"{web.url}/admin/users/{person.id}",
        headers=web.admin_headers(),
        json={"quota": {"period": "month", "tokens": 2000, "slot_seconds": 60}},
    ).raise_for_status()
    past_week(web, person.id, "llama3.2:1b")
    past_week(web, admin.id, "llava:7b")
    for text in ("Hello", "What is a slot?", "Thanks"):
        chat(web, USER, PASSWORD, text=text)
    page = open_page(browser, theme=theme)
    try:
        sign_in(page, web.url, USER, PASSWORD)
        open_usage(page)
        expect(page.locator("#usage-quota")).to_be_visible()
        screenshot(page, f"usage-{theme}")
        page.get_by_role("button", name="Sign out").click()
        sign_in(page, web.url, web.admin_email, web.admin_password)
        open_usage(page)
        page.get_by_label("Whose").select_option("everyone")
        expect(
            page.locator("#usage-tables").get_by_role("table", name="Use per person", exact=True)
        ).to_be_visible()
        screenshot(page, f"usage-everyone-{theme}")
    finally:
        page.context.close()
