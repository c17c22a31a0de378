"""The built-in chat page, end to end in headless Chromium against a real gateway and the fake Ollama."""

import json

import pytest
from playwright.sync_api import Page, expect

from tests import tokens
from tests.browser import open_page, screenshot, send_message, sign_in
from tests.fake_ollama import FakeOllama

pytestmark = pytest.mark.storage

USER_PASSWORD = "users-long-password"


@pytest.fixture
def web(make_gateway, ollama):
    """A gateway with an admin and a user allowed one model."""
    gateway = make_gateway()
    gateway.services.users.create("user@example.com", USER_PASSWORD, "user", ["llama3.2:1b"])
    return gateway


def admin_sign_in(page: Page, web) -> None:
    sign_in(page, web.url, web.admin_email, web.admin_password)


def last_reply(page: Page):
    return page.locator(".message.assistant .body").last


def test_sign_in_fills_the_model_select_with_names_and_sizes(page, web):
    admin_sign_in(page, web)
    options = page.get_by_label("Model", exact=True).locator("option").all_text_contents()
    assert options == ["llama3.2:1b (1.2B)", "llava:7b (7B)"]


def test_a_wrong_password_is_said_plainly(page, web):
    page.goto(web.url)
    form = page.locator("#signin-view")
    form.get_by_label("Email").fill(web.admin_email)
    form.get_by_label("Password").fill("not-the-password")
    form.get_by_role("button", name="Sign in").click()
    expect(form.get_by_role("alert")).to_have_text("Wrong email or password.")


def test_the_reply_grows_while_it_streams(page, web, ollama):
    ollama.default_options = {"fake_tokens": 24, "fake_interval": 0.1}
    admin_sign_in(page, web)
    send_message(page, "Say hello a few times")
    reply = last_reply(page)
    expect(reply).not_to_be_empty()
    early = reply.inner_text()
    page.wait_for_timeout(600)
    later = reply.inner_text()
    assert len(later) > len(early) > 0
    expect(page.locator(".message.streaming")).to_have_count(1)  # still being written
    expect(reply).to_have_text("Hello, world!" * 6, timeout=10_000)
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_stop_ends_the_reply_and_closes_the_upstream_request(page, web, ollama):
    ollama.default_options = {"fake_tokens": 1000, "fake_interval": 0.05}
    admin_sign_in(page, web)
    send_message(page, "Talk for a long time")
    expect(last_reply(page)).not_to_be_empty()
    page.get_by_role("button", name="Stop").click()
    record = ollama.wait_for_stream_end(timeout=5)
    assert not record.finished
    assert record.client_gone_at is not None
    assert record.lines_sent < 1000
    expect(page.locator(".message.assistant.stopped")).to_have_count(1)
    expect(page.get_by_role("button", name="Send")).to_be_visible()


def test_conversations_survive_a_reload_and_can_be_switched(page, web, ollama):
    admin_sign_in(page, web)
    send_message(page, "First conversation")
    expect(last_reply(page)).to_have_text("Hello, world!")
    page.get_by_role("button", name="New conversation").click()
    send_message(page, "Second conversation")
    expect(last_reply(page)).to_have_text("Hello, world!")

    page.reload()
    sidebar = page.get_by_role("complementary", name="Conversations")
    expect(sidebar.get_by_role("button", name="Second conversation")).to_be_visible()
    sidebar.get_by_role("button", name="First conversation").click()
    expect(page.locator(".message.user .body")).to_have_text(["First conversation"])
    expect(last_reply(page)).to_have_text("Hello, world!")


def test_a_conversation_is_renamed_and_deleted(browser, web, ollama):
    page = open_page(browser, answer="Trip planning")
    try:
        admin_sign_in(page, web)
        send_message(page, "Where should we go?")
        expect(last_reply(page)).to_have_text("Hello, world!")
        sidebar = page.get_by_role("complementary", name="Conversations")
        page.get_by_role("button", name="Rename").click()
        expect(sidebar.get_by_role("button", name="Trip planning")).to_be_visible()
        page.get_by_role("button", name="New conversation").click()
        sidebar.get_by_role("button", name="Trip planning").click()
        page.get_by_role("button", name="Delete").click()
        expect(sidebar.get_by_role("button", name="Trip planning")).to_have_count(0)
        page.reload()
        expect(page.get_by_label("Model", exact=True)).to_be_visible()
        expect(sidebar.get_by_role("button", name="Trip planning")).to_have_count(0)
    finally:
        page.context.close()


def test_switching_model_mid_conversation_sends_the_new_model(page, web, ollama):
    admin_sign_in(page, web)
    send_message(page, "Hi")
    expect(last_reply(page)).to_have_text("Hello, world!")
    page.get_by_label("Model", exact=True).select_option("llava:7b")
    send_message(page, "And you?")
    expect(page.locator(".message.assistant header").last).to_have_text("llava:7b")
    expect(last_reply(page)).to_have_text("Hello, world!")
    sent = json.loads(ollama.requests[-1].body)
    assert sent["model"] == "llava:7b"
    assert [message["content"] for message in sent["messages"]] == ["Hi", "Hello, world!", "And you?"]


def test_system_prompt_temperature_and_max_tokens_are_sent(page, web, ollama):
    admin_sign_in(page, web)
    page.get_by_text("Settings").click()
    page.get_by_label("System prompt").fill("Answer like a pirate.")
    page.get_by_label("Temperature").fill("0.3")
    page.get_by_label("Maximum tokens").fill("64")
    page.get_by_label("Maximum tokens").blur()
    send_message(page, "Hello")
    expect(last_reply(page)).to_have_text("Hello, world!")
    sent = json.loads(ollama.requests[-1].body)
    assert sent["messages"][0] == {"role": "system", "content": "Answer like a pirate."}
    assert sent["options"] == {"temperature": 0.3, "num_predict": 64}


def test_export_json_and_import_it_back(page, web, ollama, tmp_path):
    admin_sign_in(page, web)
    send_message(page, "Remember this")
    expect(last_reply(page)).to_have_text("Hello, world!")
    with page.expect_download() as download:
        page.get_by_role("button", name="Export JSON").click()
    exported = json.loads(download.value.path().read_text())
    assert [(m["role"], m["content"]) for m in exported["messages"]] == [
        ("user", "Remember this"),
        ("assistant", "Hello, world!"),
    ]
    with page.expect_download() as markdown:
        page.get_by_role("button", name="Export Markdown").click()
    assert "Remember this" in markdown.value.path().read_text()

    path = tmp_path / "imported.json"
    path.write_text(json.dumps(exported | {"title": "Brought back"}))
    page.locator("#import-file").set_input_files(path)
    sidebar = page.get_by_role("complementary", name="Conversations")
    expect(sidebar.get_by_role("button", name="Brought back")).to_have_attribute("aria-current", "true")
    expect(page.locator(".message.user .body")).to_have_text(["Remember this"])


def test_markdown_renders_with_code_blocks_and_a_copy_button(page, web, ollama):
    ollama.default_options = {"fake_echo": True}
    admin_sign_in(page, web)
    send_message(page, "**bold** and code:\n```\nprint('hi')\n```")
    reply = last_reply(page)
    expect(reply.locator("strong")).to_have_text("bold")
    expect(reply.locator("pre code")).to_have_text("print('hi')")
    expect(reply.get_by_role("button", name="Copy")).to_be_visible()


def test_model_output_can_never_run_script(page, web, ollama):
    ollama.default_options = {"fake_echo": True}
    admin_sign_in(page, web)
    attack = 'Look: <img src=x onerror="window.pwned=1"> and <script>window.pwned=2</script> done'
    send_message(page, attack)
    reply = last_reply(page)
    expect(reply).to_contain_text('<img src=x onerror="window.pwned=1">')
    expect(reply).to_contain_text("<script>window.pwned=2</script>")
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    assert page.locator("#messages img, #messages script").count() == 0


def test_a_user_sees_no_users_page_and_only_their_models(page, web):
    sign_in(page, web.url, "user@example.com", USER_PASSWORD)
    expect(page.get_by_role("button", name="Users")).to_be_hidden()
    expect(page.get_by_role("button", name="Hosts")).to_be_hidden()
    options = page.get_by_label("Model", exact=True).locator("option")
    assert options.all_text_contents() == ["llama3.2:1b (1.2B)"]
    status = page.evaluate(
        "async () => (await fetch('/admin/users', {headers: {Authorization: "
        "'Bearer ' + localStorage.getItem('ogw.token')}})).status"
    )
    assert status == 403


def test_a_model_not_allowed_is_said_plainly(page, web, tmp_path):
    sign_in(page, web.url, "user@example.com", USER_PASSWORD)
    conversation = {"title": "Vision", "model": "llava:7b", "messages": []}
    path = tmp_path / "vision.json"
    path.write_text(json.dumps(conversation))
    page.locator("#import-file").set_input_files(path)
    send_message(page, "What's in the picture?")
    expect(page.locator("#chat-error")).to_contain_text("Not allowed: you may not use the model 'llava:7b'")


def test_ollama_down_is_said_plainly(page, make_gateway, unused_port):
    gateway = make_gateway(ollama_url=f"http://127.0.0.1:{unused_port}")
    sign_in(page, gateway.url, gateway.admin_email, gateway.admin_password)
    expect(page.locator("#chat-error")).to_contain_text("Ollama is not reachable")


def test_ollama_down_is_still_said_when_send_is_pressed(page, make_gateway, unused_port):
    gateway = make_gateway(ollama_url=f"http://127.0.0.1:{unused_port}")
    sign_in(page, gateway.url, gateway.admin_email, gateway.admin_password)
    expect(page.locator("#chat-error")).to_contain_text("Ollama is not reachable")
    send_message(page, "Hello?")
    expect(page.locator("#chat-error")).to_contain_text("Ollama is not reachable")
    expect(page.locator("#chat-error")).not_to_contain_text("Pick a model")


def test_no_model_allowed_is_said_on_send_and_a_model_allowed_later_is_picked_up(page, web, ollama):
    person = web.services.users.create("nobody@example.com", USER_PASSWORD, "user", [])
    sign_in(page, web.url, "nobody@example.com", USER_PASSWORD)
    expect(page.locator("#chat-error")).to_contain_text("No model is available to you yet")
    send_message(page, "Hello?")
    expect(page.locator("#chat-error")).to_contain_text("No model is available to you yet")
    # The admin allows one meanwhile: the press looked again, and the next one is answered.
    web.services.users.update(person.id, models=["llama3.2:1b"])
    send_message(page, "Hello?")
    expect(page.get_by_label("Model", exact=True)).to_have_value("llama3.2:1b")
    expect(page.locator("#chat-error")).to_be_hidden()
    send_message(page, "Hello?")
    expect(last_reply(page)).not_to_be_empty()
    assert ollama.requests[-1].model == "llama3.2:1b"


def test_a_model_problem_solved_meanwhile_is_no_longer_said_after_the_next_send(page, web, ollama):
    person = web.services.users.find_by_email("user@example.com")
    sign_in(page, web.url, "user@example.com", USER_PASSWORD)
    send_message(page, "Hello?")
    expect(last_reply(page)).not_to_be_empty()
    web.services.users.update(person.id, models=[])
    page.reload()
    expect(page.locator("#chat-error")).to_contain_text("No model is available to you yet")
    # The remembered conversation keeps its model; once the admin allows it again, sending works, and the
    # problem said at load time goes away instead of standing under every reply.
    web.services.users.update(person.id, models=["llama3.2:1b"])
    send_message(page, "Again?")
    expect(page.locator(".message.assistant .body")).to_have_count(2)
    expect(last_reply(page)).not_to_be_empty()
    expect(page.locator("#chat-error")).to_be_hidden()


def test_the_browser_finds_the_gateways_icon(page, web):
    response = page.request.get(web.url + "/favicon.ico")
    assert response.status == 200
    assert response.headers["content-type"] == "image/x-icon"
    assert response.body()[:4] == b"\0\0\1\0"  # an icon file, as browsers expect at this path


def test_a_missing_model_is_said_plainly(page, web, ollama):
    admin_sign_in(page, web)
    ollama.models = [model for model in ollama.models if model["name"] != "llava:7b"]
    page.get_by_label("Model", exact=True).select_option("llava:7b")
    send_message(page, "Hi")
    expect(page.locator("#chat-error")).to_contain_text("Not found: model 'llava:7b' not found")


def test_an_upload_too_large_is_said_plainly(page, make_gateway, ollama, tmp_path):
    gateway = make_gateway(max_upload_mb=1)
    sign_in(page, gateway.url, gateway.admin_email, gateway.admin_password)
    big = tmp_path / "notes.txt"
    big.write_text("x" * (2 * 1024 * 1024))
    page.locator("#attach-file").set_input_files(big)
    expect(page.locator("#chat-error")).to_contain_text("Too large")


def test_attachments_go_to_the_model(page, web, ollama, tmp_path):
    ollama.default_options = {"fake_echo": True}
    admin_sign_in(page, web)
    notes = tmp_path / "notes.txt"
    notes.write_text("the secret word is swordfish")
    picture = tmp_path / "dot.png"
    picture.write_bytes(
        bytes.fromhex(
            "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
            "1f15c4890000000d49444154789c63f8cfc0f01f0005000201e5273fcb0000000049454e44ae426082"
        )
    )
    page.locator("#attach-file").set_input_files([notes, picture])
    expect(page.get_by_role("list", name="Attachments").get_by_role("listitem")).to_have_count(2)
    send_message(page, "Read these")
    expect(last_reply(page)).to_contain_text("swordfish")
    sent = json.loads(ollama.requests[-1].body)["messages"][-1]
    assert "the secret word is swordfish" in sent["content"]
    assert len(sent["images"]) == 1
    assert {upload.original_name for upload in web.services.uploads.of_owner(1)} == {"notes.txt", "dot.png"}


def test_an_expired_session_signs_out_with_a_message(page, web):
    admin_sign_in(page, web)
    key = (web.settings.data_dir / "secret_key").read_text()
    admin = web.services.users.find_by_email(web.admin_email)
    short_lived = tokens.signed(tokens.claims(lifetime=2) | {"sub": admin.identity}, key)
    page.evaluate("token => localStorage.setItem('ogw.token', token)", short_lived)
    page.reload()
    expect(page.get_by_label("Model", exact=True)).to_be_visible()
    expect(page.get_by_role("status")).to_contain_text("expired", timeout=8_000)
    expect(page.locator("#signin-view").get_by_label("Email")).to_be_visible()


def test_api_keys_are_created_shown_once_listed_and_revoked(page, web):
    admin_sign_in(page, web)
    page.get_by_role("button", name="API keys").click()
    page.get_by_label("Key name").fill("my script")
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("#new-key-value")).to_contain_text("ogw_")
    key = page.locator("#new-key-value").inner_text()
    rows = page.locator("#key-rows tr")
    expect(rows).to_have_count(1)
    expect(rows.first).to_contain_text("my script")
    assert key not in rows.first.inner_text()
    rows.first.get_by_role("button", name="Revoke").click()
    expect(rows).to_have_count(0)
    assert web.services.keys.find(key) is None


def test_a_batch_key_is_made_with_its_checkbox_and_listed_as_batch(page, web):
    admin_sign_in(page, web)
    page.get_by_role("button", name="API keys").click()
    page.get_by_label("Key name").fill("nightly job")
    page.get_by_label("Batch").check()
    page.get_by_role("button", name="Create key").click()
    expect(page.locator("#new-key-value")).to_contain_text("ogw_")
    key = page.locator("#new-key-value").inner_text()
    expect(page.locator("#key-rows tr", has_text="nightly job")).to_contain_text("batch")
    expect(page.get_by_label("Batch")).not_to_be_checked()
    assert web.services.keys.find(key).priority == "batch"


def test_an_admin_adds_disables_and_limits_a_user(page, web):
    admin_sign_in(page, web)
    page.get_by_role("button", name="Users").click()
    form = page.locator("#user-form")
    form.get_by_label("Email").fill("new@example.com")
    form.get_by_label("Password").fill("a-new-users-password")
    form.get_by_label("Models").fill("llama3.2:1b")
    form.get_by_role("button", name="Add user").click()
    row = page.locator("#user-rows tr", has_text="new@example.com")
    expect(row.get_by_label("Models of new@example.com")).to_have_value("llama3.2:1b")
    row.get_by_role("button", name="Disable").click()
    expect(row).to_contain_text("yes")
    row.get_by_label("Role of new@example.com").select_option("admin")
    row.get_by_label("Models of new@example.com").fill("")
    # The select shows "admin" as soon as it is picked: wait for the save itself before reading the database.
    with page.expect_response(lambda answer: answer.request.method == "PATCH") as saved:
        row.get_by_role("button", name="Save").click()
    assert saved.value.ok
    stored = web.services.users.find_by_email("new@example.com")
    assert (stored.role, stored.models, stored.disabled) == ("admin", None, True)


def test_an_admin_sees_adds_drains_and_removes_ollama_hosts(page, web, ollama):
    second = FakeOllama(num_parallel=2).start()
    try:
        admin_sign_in(page, web)
        page.get_by_role("button", name="Hosts").click()
        environment = page.locator("#host-rows tr").first
        expect(environment).to_contain_text("environment")
        expect(environment).to_contain_text("healthy")
        expect(environment.get_by_role("button", name="Remove")).to_have_count(0)

        form = page.locator("#host-form")
        form.get_by_label("Host name").fill("gpu-2")
        form.get_by_label("URL").fill(second.url.replace("http://", "http://ops:sekrit@"))
        form.get_by_label("Slots").fill("2")
        form.get_by_role("button", name="Add host").click()
        row = page.locator("#host-rows tr", has_text="gpu-2")
        expect(row).to_contain_text(second.url)
        expect(row).to_contain_text("stored")
        expect(page.locator("#host-rows")).not_to_contain_text("sekrit")
        # Its check lists its models: each with its slots, running and waiting requests.
        second.wait_until(lambda: any(r.path == "/api/ps" for r in second.requests), timeout=5)
        page.get_by_role("button", name="Refresh").click()
        expect(row).to_contain_text("llama3.2:1b: 2 slots (configured), 0 running, 0 waiting")

        row.get_by_role("button", name="Drain gpu-2").click()
        expect(row).to_contain_text("draining")
        assert web.services.fleet.hosts.by_id["h1"].config.draining
        row.get_by_role("button", name="Resume gpu-2").click()
        expect(row).not_to_contain_text("draining")
        row.get_by_role("button", name="Remove gpu-2").click()
        expect(page.locator("#host-rows tr")).to_have_count(1)
        assert "h1" not in web.services.fleet.hosts.by_id

        form.get_by_label("Host name").fill("again")
        form.get_by_label("URL").fill(web.settings.ollama_url)
        form.get_by_role("button", name="Add host").click()
        expect(page.locator("#hosts-error")).to_contain_text("that Ollama is already a host: env-1")
    finally:
        second.stop()


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_themes_follow_the_system_and_toggle_with_screenshots(browser, web, ollama, theme):
    page = open_page(browser, theme=theme)
    try:
        page.goto(web.url)
        screenshot(page, f"sign-in-{theme}")
        assert page.evaluate("document.documentElement.dataset.theme") == theme
        admin_sign_in(page, web)
        ollama.default_options = {"fake_echo": True}
        send_message(
            page, "Here is some Markdown:\n\n- a **list**\n- with `code`\n\n```python\nprint('hello')\n```"
        )
        expect(last_reply(page).locator("pre")).to_be_visible()
        screenshot(page, f"chat-{theme}")
        page.get_by_role("button", name="API keys").click()
        screenshot(page, f"api-keys-{theme}")
        page.get_by_role("button", name="Users").click()
        expect(page.locator("#user-rows tr")).to_have_count(2)
        screenshot(page, f"users-{theme}")
        page.get_by_role("button", name="Hosts").click()
        expect(page.locator("#host-rows tr")).to_have_count(1)
        screenshot(page, f"hosts-{theme}")
        other = "dark" if theme == "light" else "light"
        page.get_by_role("button", name="Dark theme").click()
        assert page.evaluate("document.documentElement.dataset.theme") == other
    finally:
        page.context.close()


@pytest.mark.parametrize("width", [375, 1280])
def test_the_page_fits_phone_and_desktop_widths(browser, web, ollama, width):
    page = open_page(browser, width=width, height=780)
    try:
        ollama.default_options = {"fake_echo": True}
        admin_sign_in(page, web)
        send_message(page, "A long line: " + "x" * 300 + "\n```\n" + "y" * 300 + "\n```")
        expect(last_reply(page).locator("pre")).to_be_visible()
        if width == 375:
            screenshot(page, "chat-phone")
        for view in ("Chat", "API keys", "Usage", "Users", "Hosts"):
            page.get_by_role("button", name=view, exact=True).click()
            overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
            assert overflow <= 0, f"{view} scrolls sideways by {overflow}px at {width}px"
    finally:
        page.context.close()
