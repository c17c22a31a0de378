"""manage.py, the operator's command line: it works on the database directly, beside a running gateway."""

import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.processes import REPO, clean_environment
from tests.servers import add_user

pytestmark = pytest.mark.storage

PASSWORD_LINE = re.compile(r"^password: (\S+)$", re.MULTILINE)
KEY_LINE = re.compile(r"^key: (ogw_\S+)$", re.MULTILINE)


@pytest.fixture
def gateway(make_gateway, tmp_path, ollama):
    return make_gateway(data_dir=tmp_path / "data", login_max_failures=3)


def manage(gateway, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "manage.py"), *args],
        cwd=gateway.settings.data_dir.parent,
        # The gateway's settings, as an operator's .env would give them both.
        env=clean_environment(
            DATA_DIR=str(gateway.settings.data_dir),
            OLLAMA_URL=gateway.settings.ollama_url,
            **_database_of(gateway),
        ),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _database_of(gateway) -> dict[str, str]:
    url = gateway.settings.database_url
    return {"DATABASE_URL": url} if url else {}


def login(gateway, email: str, password: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/login", json={"email": email, "password": password})


def test_create_user_prints_a_generated_password_that_signs_in(gateway):
    result = manage(gateway, "create-user", "eve@example.com", "--models", "llama3.2:1b")
    assert result.returncode == 0, result.stderr
    (password,) = PASSWORD_LINE.findall(result.stdout)
    token = login(gateway, "eve@example.com", password).json()["access_token"]
    me = httpx.get(f"{gateway.url}/me", headers={"Authorization": f"Bearer {token}"}).json()
    assert (me["role"], me["models"]) == ("user", ["llama3.2:1b"])


def test_create_user_can_read_the_password_from_stdin(gateway):
    result = manage(
        gateway,
        "create-user",
        "fay@example.com",
        "--role",
        "admin",
        "--password-stdin",
        stdin="fays-password-1\n",
    )
    assert result.returncode == 0, result.stderr
    assert "fays-password-1" not in result.stdout
    assert login(gateway, "fay@example.com", "fays-password-1").status_code == 200


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("create-user", "not-an-email"), "", "email"),
        (("create-user", "gus@example.com", "--password-stdin"), "short\n", "8 characters"),
        (("create-user", "gus@example.com", "--password-stdin"), "x" * 5000 + "\n", "at most 1024"),
        (("create-user", "gus@example.com", "--password-stdin"), "password123\n", "too common"),
        (("reset-password", "admin@example.com", "--password-stdin"), "x" * 5000 + "\n", "at most 1024"),
        (("reset-password", "nobody@example.com"), "", "no user"),
        (("create-key", "nobody@example.com", "k"), "", "no user"),
        (("revoke-key", "999"), "", "no key"),
    ],
)
def test_a_mistake_is_one_line_and_exit_status_1(gateway, args, stdin, message):
    result = manage(gateway, *args, stdin=stdin)
    assert result.returncode == 1
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_users_lists_everyone(gateway):
    manage(gateway, "create-user", "hal@example.com")
    listing = manage(gateway, "users").stdout
    assert gateway.admin_email in listing
    assert "hal@example.com\tuser\tenabled\tevery model" in listing


def test_reset_password_lets_a_locked_out_admin_back_in(gateway):
    old_token = gateway.login(gateway.admin_email, gateway.admin_password)
    for _ in range(3):
        login(gateway, gateway.admin_email, "wrong-password")
    assert login(gateway, gateway.admin_email, gateway.admin_password).status_code == 429

    result = manage(gateway, "reset-password", gateway.admin_email)
    assert result.returncode == 0, result.stderr
    (password,) = PASSWORD_LINE.findall(result.stdout)
    assert login(gateway, gateway.admin_email, password).status_code == 200
    assert httpx.get(f"{gateway.url}/me", headers={"Authorization": f"Bearer {old_token}"}).status_code == 401


def test_create_and_revoke_a_key(gateway):
    created = manage(gateway, "create-key", gateway.admin_email, "backup job", "--expires-days", "30")
    assert created.returncode == 0, created.stderr
    (key,) = KEY_LINE.findall(created.stdout)
    assert httpx.get(f"{gateway.url}/me", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    listing = manage(gateway, "keys").stdout
    assert "backup job\tinteractive\tlast used " in listing
    assert key not in listing
    key_id = listing.split("\t", 1)[0]
    assert manage(gateway, "revoke-key", key_id).returncode == 0
    assert httpx.get(f"{gateway.url}/me", headers={"Authorization": f"Bearer {key}"}).status_code == 401


def test_a_batch_key_is_made_with_batch(gateway):
    created = manage(gateway, "create-key", gateway.admin_email, "nightly", "--batch")
    assert created.returncode == 0, created.stderr
    assert f"created key 1 'nightly' for {gateway.admin_email}, batch: " in created.stdout
    (key,) = KEY_LINE.findall(created.stdout)
    assert gateway.services.keys.find(key).priority == "batch"
    assert "nightly\tbatch\tlast used never" in manage(gateway, "keys").stdout


def _chat(gateway, token: str) -> None:
    body = {"model": "llama3.2:1b", "messages": [{"role": "user", "content": "Hi"}], "stream": False}
    response = httpx.post(f"{gateway.url}/api/chat", json=body, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text


def test_usage_prints_what_the_admin_usage_api_reports(gateway):
    admin = gateway.admin_headers()
    bea = add_user(gateway, "bea@example.com")
    for token in (admin["Authorization"].split()[1], admin["Authorization"].split()[1], bea):
        _chat(gateway, token)
    query = {"group_by": "user,model", "since": "2000-01-01"}
    # The API writes the gateway's pending records first: manage.py reads them from the database.
    api = httpx.get(f"{gateway.url}/admin/usage", params={**query, "format": "csv"}, headers=admin)
    assert api.status_code == 200

    as_csv = manage(gateway, "usage", "--group-by", "user,model", "--since", "2000-01-01", "--csv")
    assert as_csv.returncode == 0, as_csv.stderr
    assert as_csv.stdout == api.text
    assert as_csv.stdout.startswith("user,model,email,requests,prompt_tokens,")

    table = manage(gateway, "usage", "--group-by", "user,model").stdout.splitlines()
    assert table[0].split()[:4] == ["user", "model", "email", "requests"]
    [admins] = [line for line in table if gateway.admin_email in line]
    [beas] = [line for line in table if "bea@example.com" in line]
    assert (admins.split()[1], admins.split()[3]) == ("llama3.2:1b", "2")
    assert beas.split()[3] == "1"
    assert table[-1].split()[:2] == ["total", "3"]

    bea_id = gateway.services.users.find_by_email("bea@example.com").id
    hers = manage(gateway, "usage", "--user-id", str(bea_id)).stdout.splitlines()
    assert hers[0].split()[0] == "requests" and hers[1].split()[0] == "1", "totals only, of one person"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--group-by", "user,colour"), "unknown group 'colour'"),
        (("--since", "yesterday"), "since: expected an ISO-8601 date"),
    ],
)
def test_a_usage_mistake_is_one_line_and_exit_status_1(gateway, args, message):
    result = manage(gateway, "usage", *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 2, "which database, then the mistake"


@pytest.mark.sqlite_only
def test_a_data_folder_manage_creates_is_private(tmp_path):
    data_dir = tmp_path / "fresh"
    result = subprocess.run(
        [sys.executable, str(REPO / "manage.py"), "create-user", "ivy@example.com"],
        cwd=tmp_path,
        env=clean_environment(DATA_DIR=str(data_dir)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert f"database {data_dir / 'gateway.sqlite3'} (none was there: creating it)" in result.stderr
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for path in data_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_a_mistake_in_the_settings_is_one_line_and_exit_status_1(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "manage.py"), "users"],
        cwd=tmp_path,
        env=clean_environment(ADMIN_EMAIL="admin", DATA_DIR=str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("manage.py: configuration error: ADMIN_EMAIL='admin': expected an email address")
    assert not (tmp_path / "data").exists()


def _manage_from(folder, *args: str, **settings: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "manage.py"), *args],
        cwd=folder,
        env=clean_environment(**settings),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.sqlite_only
def test_every_command_says_which_database_it_opened(gateway, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data_dir = gateway.settings.data_dir.resolve()
    result = _manage_from(elsewhere, "users", DATA_DIR=str(data_dir))
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [f"manage.py: database {data_dir / 'gateway.sqlite3'}"]
    assert gateway.admin_email in result.stdout


@pytest.mark.sqlite_only
@pytest.mark.parametrize(
    "args",
    [
        ("users",),
        ("keys",),
        ("reset-password", "admin@local"),
        ("create-key", "admin@local", "nightly"),
        ("revoke-key", "1"),
    ],
    ids=lambda args: args[0],
)
def test_a_command_run_from_another_folder_refuses_to_create_a_database(tmp_path, args):
    # The gateway's folder is elsewhere: here, `./data` does not exist.
    result = _manage_from(tmp_path, *args)
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.startswith(f"manage.py: no database at {tmp_path / 'data' / 'gateway.sqlite3'}; ")
    assert "the gateway's folder" in line
    assert "DATA_DIR" in line
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == [], "nothing created"


@pytest.mark.sqlite_only
@pytest.mark.skipif(
    not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, where nobody can make a folder"
)
def test_a_data_dir_that_cannot_be_made_is_one_line(tmp_path):
    result = _manage_from(tmp_path, "create-user", "ivy@example.com", DATA_DIR="/sys/ollama-gateway-data")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("manage.py: cannot use /sys/ollama-gateway-data/")


# Ollama hosts


async def _check_every_host_checks(gateway) -> None:
    gateway.services.fleet.start()  # what `python main.py` does at start: check now, then every interval


def _hosts_of(gateway) -> dict[str, dict]:
    listed = httpx.get(f"{gateway.url}/admin/hosts", headers=gateway.admin_headers()).json()
    return {host["id"]: host for host in listed}


def _until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)


def test_hosts_added_changed_and_removed_here_reach_a_running_gateway_at_its_next_check(
    make_gateway, tmp_path
):
    gateway = make_gateway(data_dir=tmp_path / "data", host_check_seconds=0.2)
    gateway.run(_check_every_host_checks(gateway))
    added = manage(gateway, "add-host", "gpu-2", "http://ops:s3cret@gpu-2.lan:11434", "--slots", "2")
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("added host h1 'gpu-2' at http://gpu-2.lan:11434, enabled, 2 slots; ")
    assert "a running gateway takes it up within HOST_CHECK_SECONDS (10 s)" in added.stdout
    _until(lambda: "h1" in _hosts_of(gateway))
    assert (_hosts_of(gateway)["h1"]["name"], _hosts_of(gateway)["h1"]["slots"]) == ("gpu-2", 2)

    drained = manage(gateway, "drain-host", "h1")
    assert drained.returncode == 0, drained.stderr
    assert drained.stdout.startswith("changed host h1 'gpu-2' at http://gpu-2.lan:11434, draining, 2 slots")
    _until(lambda: _hosts_of(gateway)["h1"]["draining"])
    changed = manage(gateway, "change-host", "h1", "--name", "gpu-two", "--no-drain", "--learn-slots")
    assert changed.returncode == 0, changed.stderr
    assert "h1 'gpu-two' at http://gpu-2.lan:11434, enabled, slots learned" in changed.stdout
    _until(lambda: _hosts_of(gateway)["h1"]["name"] == "gpu-two")
    assert (_hosts_of(gateway)["h1"]["draining"], _hosts_of(gateway)["h1"]["slots"]) == (False, None)

    listing = manage(gateway, "hosts").stdout.splitlines()
    assert listing == [
        f"env-1\t{gateway.settings.ollama_url.split('://')[1]}\t{gateway.settings.ollama_url}\tenvironment"
        "\tenabled\tslots learned",
        "h1\tgpu-two\thttp://gpu-2.lan:11434\tstored\tenabled\tslots learned",
    ]
    assert all("s3cret" not in result.stdout for result in (added, drained, changed))

    removed = manage(gateway, "remove-host", "h1")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith("removed host h1 'gpu-two'; ")
    _until(lambda: "h1" not in _hosts_of(gateway))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("add-host", "gpu-2", "ftp://ops:s3cret@gpu-2.lan"), "url: Value error, expected an http://"),
        (("add-host", "gpu 2", "http://gpu-2.lan"), "name: "),
        (("add-host", "gpu-2", "http://gpu-2.lan", "--slots", "0"), "slots: "),
        (("add-host", "h4", "http://gpu-2.lan"), "can't look like a host's id"),
        (("add-host", "gpu-2", "{environment}"), "that Ollama is already a host: env-1"),
        (("change-host", "env-1", "--drain"), "env-1 comes from OLLAMA_URL"),
        (("change-host", "h9", "--drain"), "no host with the id h9"),
        (("change-host", "h9"), "nothing to change"),
        (("drain-host", "gpu-2"), "no host with the id gpu-2"),
        (("remove-host", "h9"), "no host with the id h9"),
        (("remove-host", "env-1"), "env-1 comes from OLLAMA_URL"),
    ],
    ids=lambda value: " ".join(value) if isinstance(value, tuple) else None,
)
def test_a_host_command_mistake_is_one_line_and_exit_status_1(gateway, args, message):
    result = manage(gateway, *(arg.format(environment=gateway.settings.ollama_url) for arg in args))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()[1:]
    assert line.startswith("manage.py: ") and message in line
    assert "s3cret" not in result.stderr
