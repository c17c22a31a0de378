"""Every setting, given a wrong value, stops the gateway with one line that names it (issue 10, item 3).

The wrong values are listed per setting, and the list must cover every field of Settings: a setting added
later fails here until it has a wrong value of its own, and so a check and a one-line message.
"""

import pytest

from core.settings import ConfigurationError, Settings
from core.settings_errors import HIDDEN, read_settings

WRONG_VALUES = {
    "ollama_url": "localhost:11434",
    "ollama_parallel": "0",
    "host_check_seconds": "inf",
    "queue_timeout_interactive": "0",
    "queue_timeout_batch": "two hours",
    "max_waiting_per_user": "-1",
    "max_inflight_per_user": "1.5",
    "max_waiting_per_key": "none",
    "max_inflight_per_key": "-3",
    "time_zone": "Mars/Olympus_Mons",
    "secret_key": "too-short-secret",
    "admin_email": "admin at example.com",
    "admin_password": "password123",
    "access_token_expire_minutes": "ten",
    "data_dir": "{a_file}",
    "database_url": "mysql://db/gateway",
    "redis_url": "http://cache:6379",
    "redis_prefix": "gateway keys",
    "lease_seconds": "600",
    "quotas_without_redis": "shut",
    "max_upload_mb": "25MB",
    "max_request_mb": "0",
    "cors_origins": "*.example.com",
    "trusted_proxies": "10.0.0.0/33",
    "login_window_minutes": "-5",
    "login_max_failures": "2.5",
    "login_max_failures_per_address": "0",
    "login_max_failures_per_email": "lots",
    "login_max_attempts_per_address": "1e9x",
    "login_max_concurrent_per_address": "-1",
    "upstream_connect_timeout": "nan",
    "upstream_first_byte_timeout": "10 minutes",
    "upstream_idle_timeout": "0",
    "request_header_timeout": "twenty",
    "request_body_timeout": "-0.5",
    "graceful_shutdown_seconds": "-1",
    "log_format": "xml",
    "metrics_token": "short token",
    "host": "localhost:8000",
    "port": "0",
}
SECRETS = {"secret_key", "admin_password", "metrics_token"}


@pytest.fixture
def environment(monkeypatch, tmp_path):
    """Only the settings a test gives, and no `.env`."""
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    return monkeypatch


def test_every_setting_has_a_wrong_value_here():
    assert set(WRONG_VALUES) == set(Settings.model_fields)


def test_every_setting_says_what_it_expects():
    for name, field in Settings.model_fields.items():
        assert field.description, f"{name.upper()} has no description of what it expects"


def _mistake() -> str:
    with pytest.raises(ConfigurationError) as raised:
        read_settings()
    return str(raised.value)


@pytest.mark.parametrize("name", sorted(WRONG_VALUES))
def test_a_wrong_value_is_one_line_naming_the_setting(environment, tmp_path, name):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    value = WRONG_VALUES[name].format(a_file=a_file)
    environment.setenv(name.upper(), value)
    line = _mistake()
    assert "\n" not in line
    assert line.startswith(f"{name.upper()}=")
    assert f": expected {Settings.model_fields[name].description}" in line
    if name in SECRETS:
        assert value not in line
        assert line.startswith(f"{name.upper()}={HIDDEN}:")
    else:
        assert repr(value) in line


def test_several_mistakes_are_all_named_on_one_line(environment):
    environment.setenv("PORT", "eighty")
    environment.setenv("OLLAMA_URL", "ollama:11434")
    line = _mistake()
    assert "\n" not in line
    assert "PORT='eighty'" in line
    assert "OLLAMA_URL='ollama:11434'" in line


def test_a_rule_across_settings_names_both(environment):
    environment.setenv("LOGIN_MAX_FAILURES", "60")
    line = _mistake()
    assert line == "LOGIN_MAX_FAILURES_PER_EMAIL=50: expected a number larger than LOGIN_MAX_FAILURES (60)"


def test_a_value_with_a_line_break_stays_on_one_line(environment):
    environment.setenv("HOST", "127.0.0.1\nX-Injected: yes")
    line = _mistake()
    assert "\n" not in line
    assert "HOST='127.0.0.1\\nX-Injected: yes'" in line


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        pytest.param(
            "OLLAMA_URL", "http://user:pass@ollama:11434/base/", "http://user:pass@ollama:11434/base"
        ),
        pytest.param("OLLAMA_URL", "https://[::1]:11434", "https://[::1]:11434"),
        pytest.param("CORS_ORIGINS", "http://localhost:5173, https://App.example.com/", None),
        pytest.param("CORS_ORIGINS", "*", None),
        pytest.param("TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8, ::1", None),
        pytest.param("HOST", "::", "::"),
        pytest.param("HOST", "gateway.lan", "gateway.lan"),
        pytest.param("ADMIN_EMAIL", " admin@local ", "admin@local"),
        pytest.param("MAX_UPLOAD_MB", "0.5", 0.5),
        pytest.param("GRACEFUL_SHUTDOWN_SECONDS", "0", 0),
        pytest.param("DATABASE_URL", "postgresql://gateway@db.internal:5432/gateway", None),
        pytest.param("DATABASE_URL", "postgres://gateway:pw@db.internal/gateway?sslmode=require", None),
        pytest.param("REDIS_URL", "redis://:pw@cache.internal:6379/0", None),
        pytest.param("REDIS_URL", "rediss://gateway:pw@cache.internal", None),
        pytest.param("REDIS_URL", "unix:///run/redis/redis.sock", None),
        pytest.param("REDIS_PREFIX", "team-a.gateway:", "team-a.gateway:"),
        pytest.param("LEASE_SECONDS", "2.5", 2.5),
    ],
)
def test_a_right_value_is_accepted(environment, name, value, expected):
    environment.setenv(name, value)
    read = getattr(read_settings(), name.lower())
    if expected is not None:
        assert read == expected


def test_cors_origins_are_kept_as_browsers_send_them(environment):
    environment.setenv("CORS_ORIGINS", "http://localhost:5173, https://App.example.com/")
    assert read_settings().cors_origins == ["http://localhost:5173", "https://app.example.com"]


def test_an_admin_email_manage_py_would_refuse_is_refused(environment):
    environment.setenv("ADMIN_EMAIL", "two words@example.com")
    with pytest.raises(ConfigurationError, match="ADMIN_EMAIL"):
        read_settings()


def test_a_data_dir_inside_a_file_is_refused(environment, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    environment.setenv("DATA_DIR", str(a_file / "data"))
    assert _mistake().endswith(f"; {a_file} is a file, not a folder")


@pytest.mark.parametrize(
    ("value", "shown", "secrets"),
    [
        pytest.param(
            "http://bob:s3cret@ollama:11434/?x=1",
            "http://(hidden)@ollama:11434/?(hidden)",
            ["bob", "s3cret", "x=1"],
            id="user-and-password",
        ),
        pytest.param(
            "http://ollama:s3cr3t/Pw@gpu-box:11434",
            "http://(hidden)@gpu-box:11434",
            ["s3cr3t", "Pw"],
            id="slash-in-the-password",
        ),
        pytest.param(
            "http://alice@corp.example:hunter2@gpu-box:11434/?x",
            "http://(hidden)@gpu-box:11434/?(hidden)",
            ["alice", "corp.example", "hunter2"],
            id="at-in-the-user",
        ),
        pytest.param(
            "http://user:p@ss@host:11434/?x",
            "http://(hidden)@host:11434/?(hidden)",
            ["p@ss", "@ss"],
            id="at-in-the-password",
        ),
        pytest.param(
            "http://u:pw#s3cret@host:11434",
            "http://(hidden)@host:11434",
            ["s3cret"],
            id="hash-in-the-password",
        ),
        pytest.param(
            "https://gpu-box/ollama?api_key=sk-live-123",
            "https://gpu-box/ollama?(hidden)",
            ["api_key", "sk-live-123"],
            id="token-in-the-query",
        ),
        pytest.param(
            "https://gpu-box/ollama#sk-live-123",
            "https://gpu-box/ollama#(hidden)",
            ["sk-live-123"],
            id="fragment",
        ),
        pytest.param("ollama:s3cret@gpu-box:11434", "(hidden)@gpu-box:11434", ["s3cret"], id="no-scheme"),
        pytest.param(
            "http://a:first-s3cret@gpu1:11434,gpu2:second-s3cret@x",
            "http://(hidden)@gpu1:11434,(hidden)@x",
            ["first-s3cret", "second-s3cret"],
            id="several-hosts",
        ),
    ],
)
def test_the_secrets_in_a_wrong_ollama_url_are_hidden(environment, value, shown, secrets):
    environment.setenv("OLLAMA_URL", value)
    line = _mistake()
    assert line.startswith(f"OLLAMA_URL={shown!r}: expected")
    for secret in secrets:
        assert secret not in line


@pytest.mark.parametrize("value", ["http://ollama:0", "http://ollama:00/base"])
def test_an_ollama_url_on_port_0_is_refused(environment, value):
    environment.setenv("OLLAMA_URL", value)
    assert _mistake().endswith("; port 0 is not a port Ollama can listen on")


@pytest.mark.parametrize(
    "value",
    ["http://xn--a.lan:11434", "http://user:s3cret@xn--a.lan", f"http://{'a' * 64}.lan", "http://a..lan"],
    ids=["not-idna", "not-idna-with-password", "label-too-long", "empty-label"],
)
def test_an_ollama_url_whose_host_cannot_be_resolved_as_written_is_refused_not_a_crash(environment, value):
    environment.setenv("OLLAMA_URL", value)
    line = _mistake()
    assert line.endswith("; the host is not a valid domain name")
    assert "s3cret" not in line


@pytest.mark.parametrize(
    "value", ["http://user:s3cret@ho\uff0fst", "http://user:s3c'ret\uff0f@host"], ids=["plain", "quote-in-it"]
)
def test_the_reason_for_a_broken_ollama_url_never_quotes_its_password(environment, value):
    environment.setenv("OLLAMA_URL", value)
    line = _mistake()
    assert "s3c" not in line
    assert line.endswith("; netloc contains invalid characters under nfkc normalization")


def test_the_password_in_a_wrong_database_url_is_hidden(environment):
    environment.setenv("DATABASE_URL", "postgresql://bob:s3cret@db.internal")
    line = _mistake()
    assert "s3cret" not in line
    # As OLLAMA_URL's: the whole of who signs in is hidden, the user's name with the password.
    assert line.startswith("DATABASE_URL='postgresql://(hidden)@db.internal': expected")
    assert line.endswith("; it names no database (postgresql://host/database)")


def test_an_env_file_that_is_not_text_is_one_line(environment, tmp_path):
    (tmp_path / ".env").write_bytes(b"PORT=\xff\xfe\n")
    line = _mistake()
    assert line.startswith(".env: ")
    assert "\n" not in line


def test_the_password_in_a_wrong_redis_url_is_hidden(environment):
    environment.setenv("REDIS_URL", "redis://:s3cret@cache.internal:6379/sessions")
    line = _mistake()
    assert "s3cret" not in line
    assert line.startswith("REDIS_URL='redis://(hidden)@cache.internal:6379/sessions': expected")
    assert line.endswith("; the path must be a database number, such as /0, not /sessions")


@pytest.mark.parametrize("value", ["0.5", "61", "nan"])
def test_a_lease_outside_one_to_sixty_seconds_is_refused(environment, value):
    environment.setenv("LEASE_SECONDS", value)
    assert _mistake().startswith(f"LEASE_SECONDS={value!r}: expected a number of seconds from 1 to 60")
