"""The files under deploy/, checked by the tools made for them and against the code they run.

- The systemd unit: `systemd-analyze verify` (any warning fails, as an unknown or mistyped setting is only a
  warning to systemd) and `systemd-analyze security --offline`; the gateway under the kernel's
  MemoryDenyWriteExecute, which recent systemd applies for the unit's setting.
- The nginx site: `nginx -t` on it, and nginx run with it in front of `python main.py` started with the
  unit's settings (TLS, the redirect, a stream passed on line by line, the client's address).
- The Dockerfile: hadolint. The compose file: the Compose Specification's JSON schema, as Docker Compose
  validates it, and the references between its parts.
- All of them against the code: setting names, ports, timeouts, body caps, the code the image copies.

Not run here: no image is built and no container started (no Docker engine), and systemd does not start the
unit (it is not this machine's init). `make test` installs nginx, systemd-analyze and openssl (`make
deploy-tools`); hadolint and the schema validator come from requirements-dev.txt.
"""

import ast
import errno
import inspect
import ipaddress
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import jsonschema
import pytest
import uvicorn
import yaml

from bench.nginx_conf import folder_conf
from core.settings import MIB, Settings
from main import MULTIPART_ALLOWANCE
from routes.web import WEB_DIR
from tests.cluster import nginx_site
from tests.processes import REPO, SETTING_NAMES, free_port, running_main
from tests.streams import chat_body

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "ollama-gateway.service"
NGINX_SITE = DEPLOY / "nginx-site.conf"
DOCKERFILE = DEPLOY / "Dockerfile"
DOCKERIGNORE = DEPLOY / "Dockerfile.dockerignore"
COMPOSE = DEPLOY / "compose.yaml"
ENV_EXAMPLE = DEPLOY / "gateway.env.example"
# The replicas' set: three gateways behind nginx, Postgres, Redis and Ollama.
COMPOSE_REPLICAS = DEPLOY / "compose.replicas.yaml"
REPLICAS_SITE = DEPLOY / "nginx-replicas.conf"
REPLICAS_ENV_EXAMPLE = DEPLOY / "replicas.env.example"
COMPOSE_SCHEMA = REPO / "tests" / "compose-spec" / "compose-spec.json"

# Where the unit expects the code, and the placeholders the site leaves for the operator's certificate.
INSTALLED_CODE = "/opt/ollama-gateway"
CERTIFICATE = "/etc/ssl/ollama-gateway/fullchain.pem"
CERTIFICATE_KEY = "/etc/ssl/ollama-gateway/privkey.pem"

ADMIN_PASSWORD = "deploy-test-password"
# The worst `systemd-analyze security` exposure (0 to 10) the unit may drift to; it scores 1.2 now.
MAX_EXPOSURE = 2.0
TOOL_TIMEOUT = 60


def _default(name: str) -> float:
    default = Settings.model_fields[name].default
    assert isinstance(default, int | float)
    return default


def _tool(name: str, *extra_dirs: str) -> str:
    # Debian puts nginx in /usr/sbin, which is not on every user's PATH.
    search = ":".join([*extra_dirs, "/usr/local/sbin", "/usr/sbin", "/usr/bin", "/bin"])
    found = shutil.which(name) or shutil.which(name, path=search)
    if found is None:
        raise RuntimeError(f"{name} is not installed: run `make test`, which installs it (make deploy-tools)")
    return found


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=TOOL_TIMEOUT, **kwargs)


# The systemd unit.


def _unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order: a unit may assign a key more than once."""
    entries, section = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def _unit_values(key: str) -> list[str]:
    return [value for _, name, value in _unit_entries(UNIT.read_text()) if name == key]


def _unit_value(key: str) -> str:
    values = _unit_values(key)
    assert len(values) == 1, f"{key}= is set {len(values)} times in {UNIT.name}"
    return values[0]


def _unit_environment() -> dict[str, str]:
    return dict(assignment.split("=", 1) for assignment in _unit_values("Environment"))


def _unit_for_this_machine(folder: Path, text: str) -> Path:
    """The unit as `systemd-analyze verify` can check it here: it refuses an ExecStart= whose program does
    not exist, so the code's folder is this checkout and its Python the one running the tests."""
    python = f"{INSTALLED_CODE}/.venv/bin/python"
    assert python in text, f"{UNIT.name} no longer runs {python}: update this test"
    path = folder / UNIT.name
    path.write_text(text.replace(python, sys.executable).replace(INSTALLED_CODE, str(REPO)))
    return path


def _verify_unit(folder: Path, text: str) -> subprocess.CompletedProcess[str]:
    unit = _unit_for_this_machine(folder, text)
    # Only this unit's own problems: a broken unit elsewhere on the machine is not the gateway's.
    return _run([_tool("systemd-analyze"), "verify", "--man=no", "--recursive-errors=no", str(unit)])


def test_systemd_unit_verifies_without_a_warning(tmp_path):
    verified = _verify_unit(tmp_path, UNIT.read_text())
    assert verified.returncode == 0, verified.stderr
    assert verified.stderr.strip() == ""


@pytest.mark.parametrize(
    ("original", "broken"),
    [
        pytest.param("ProtectSystem=strict", "ProtectSystm=strict", id="unknown-key"),
        pytest.param("ProtectSystem=strict", "ProtectSystem=stricter", id="bad-value"),
        pytest.param("ExecStart=", "ExecStart=/nowhere/python ", id="missing-program"),
    ],
)
def test_systemd_unit_check_fails_on_a_broken_unit(tmp_path, original, broken):
    """The check above would notice a mistake: systemd itself only warns about the first two."""
    text = UNIT.read_text()
    assert original in text
    verified = _verify_unit(tmp_path, text.replace(original, broken, 1))
    assert verified.returncode != 0 or verified.stderr.strip() != ""


def test_systemd_unit_exposure_stays_low(tmp_path):
    unit = _unit_for_this_machine(tmp_path, UNIT.read_text())
    analyzed = _run(
        [
            _tool("systemd-analyze"),
            "security",
            "--offline=yes",
            f"--threshold={int(MAX_EXPOSURE * 10)}",
            "--no-pager",
            str(unit),
        ]
    )
    overall = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", analyzed.stdout)
    assert overall is not None, analyzed.stdout + analyzed.stderr
    assert float(overall.group(1)) <= MAX_EXPOSURE, analyzed.stdout
    assert analyzed.returncode == 0, analyzed.stdout + analyzed.stderr


def test_systemd_unit_keeps_data_in_its_state_directory():
    state = _unit_value("StateDirectory")
    assert _unit_environment()["DATA_DIR"] == f"/var/lib/{state}"
    assert _unit_value("StateDirectoryMode") == "0700"
    assert _unit_value("ProtectSystem") == "strict"


def test_systemd_unit_waits_longer_than_the_graceful_shutdown():
    assert _unit_value("KillSignal") == "SIGTERM"
    assert float(_unit_value("TimeoutStopSec")) > _default("graceful_shutdown_seconds")


# MemoryDenyWriteExecute: systemd 254 and later apply it with the kernel's prctl(PR_SET_MDWE) where the
# kernel has it (Linux 6.3 and later), and with a seccomp filter (stricter about mprotect) before that.
PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
MDWE_LAUNCHER = f"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) != 0:
    sys.exit("prctl(PR_SET_MDWE): " + os.strerror(ctypes.get_errno()))
os.execv(sys.argv[1], sys.argv[1:])
"""


def _kernel_has_mdwe() -> bool:
    probe = _run([sys.executable, "-c", MDWE_LAUNCHER, "/bin/true"])
    if probe.returncode == 0:
        return True
    # Only a kernel that does not know the request is a reason to skip; any other refusal is a failure.
    assert os.strerror(errno.EINVAL) in probe.stderr, probe.stderr
    return False


def test_gateway_serves_under_memory_deny_write_execute(tmp_path, ollama):
    """uvloop, httptools, Argon2 (cffi) and the multipart parser never ask for writable executable memory."""
    assert _unit_value("MemoryDenyWriteExecute") == "yes"
    if not _kernel_has_mdwe():
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3 and later)")
    launcher = [sys.executable, "-c", MDWE_LAUNCHER]
    # The launcher does what it says: memory both writable and executable is refused after it.
    refused = _run([*launcher, sys.executable, "-c", "import mmap; mmap.mmap(-1, 4096, prot=7)"])
    assert "Permission denied" in refused.stderr
    data = tmp_path / "data"
    with (
        running_main(
            tmp_path,
            launcher=launcher,
            OLLAMA_URL=ollama.url,
            ADMIN_PASSWORD=ADMIN_PASSWORD,
            DATA_DIR=str(data),
        ) as (url, console, _),
        httpx.Client(base_url=url, timeout=30) as http,
    ):
        signed_in = http.post("/login", json={"email": "admin@local", "password": ADMIN_PASSWORD})
        assert signed_in.status_code == 200, console.read_text()
        http.headers["Authorization"] = f"Bearer {signed_in.json()['access_token']}"
        with http.stream("POST", "/api/chat", json=chat_body(tokens=3)) as streamed:
            lines = [json.loads(line) for line in streamed.iter_lines()]
        assert lines[-1]["done"] is True
        uploaded = http.post("/upload", files={"file": ("notes.txt", b"hello", "text/plain")})
        assert uploaded.status_code == 201, uploaded.text


# The nginx site.

# uvicorn's default, which `python main.py` keeps (tests/test_abuse.py checks an idle connection is closed).
UVICORN_KEEP_ALIVE = inspect.signature(uvicorn.Config).parameters["timeout_keep_alive"].default
NGINX_TOKEN = re.compile(r'"[^"]*"|[{};]|[^\s{};"]+')


@dataclass(frozen=True)
class Directive:
    context: tuple[str, ...]  # the blocks it is in, e.g. ("server", "location /api/blobs/")
    name: str
    arguments: tuple[str, ...]


def _nginx_directives(text: str) -> list[Directive]:
    uncommented = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    directives: list[Directive] = []
    context: list[str] = []
    words: list[str] = []
    for token in NGINX_TOKEN.findall(uncommented):
        if token == ";":
            directives.append(Directive(tuple(context), words[0], tuple(words[1:])))
            words = []
        elif token == "{":
            context.append(" ".join(words))
            words = []
        elif token == "}":
            context.pop()
        else:
            words.append(token)
    return directives


def _site_setting(name: str, context: tuple[str, ...], site: Path = NGINX_SITE) -> tuple[str, ...]:
    found = [
        d.arguments for d in _nginx_directives(site.read_text()) if (d.context, d.name) == (context, name)
    ]
    assert len(found) == 1, f"{name} in {context}: {found}"
    return found[0]


def _replaced(text: str, replacements: dict[str, str]) -> str:
    for original, replacement in replacements.items():
        assert original in text, f"{original!r} is no longer in {NGINX_SITE.name}: update this test"
        text = text.replace(original, replacement)
    return text


@dataclass(frozen=True)
class Certificate:
    certificate: Path
    key: Path


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> Certificate:
    """A throwaway self-signed certificate for the site's name and for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    made = Certificate(folder / "fullchain.pem", folder / "privkey.pem")
    created = _run(
        [
            _tool("openssl"),
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=gateway.example.lan",
            "-addext",
            "subjectAltName=DNS:gateway.example.lan,IP:127.0.0.1",
            "-keyout",
            str(made.key),
            "-out",
            str(made.certificate),
        ]
    )
    assert created.returncode == 0, created.stderr
    return made


def _site_with_certificate(text: str, made: Certificate) -> str:
    return _replaced(text, {CERTIFICATE: str(made.certificate), CERTIFICATE_KEY: str(made.key)})


def _nginx_conf(folder: Path, site: str) -> Path:
    (folder / "site.conf").write_text(site)
    conf = folder / "nginx.conf"
    # What Debian's /etc/nginx/nginx.conf gives a site, with every file nginx writes in the test's folder.
    conf.write_text(folder_conf(folder, f"include {folder}/site.conf;", worker_connections=64))
    return conf


def _nginx_test(folder: Path, site: str) -> subprocess.CompletedProcess[str]:
    conf = _nginx_conf(folder, site)
    return _run([_tool("nginx"), "-t", "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf)])


def _nginx_accepts(checked: subprocess.CompletedProcess[str]) -> bool:
    # A warning (a directive nginx ignores, an option it overrides) counts: the site must mean what it says.
    return (
        checked.returncode == 0 and "[warn]" not in checked.stderr and "test is successful" in checked.stderr
    )


def test_nginx_site_passes_nginx_t(tmp_path, certificate):
    checked = _nginx_test(tmp_path, _site_with_certificate(NGINX_SITE.read_text(), certificate))
    assert _nginx_accepts(checked), checked.stderr


@pytest.mark.parametrize(
    ("original", "broken"),
    [
        pytest.param("proxy_buffering off;", "proxy_bufering off;", id="unknown-directive"),
        pytest.param("proxy_read_timeout 900s;", "proxy_read_timeout 900x;", id="bad-value"),
        pytest.param("gzip off;", "gzip off", id="missing-semicolon"),
        pytest.param(
            "ssl_protocols TLSv1.2 TLSv1.3;",
            "ssl_protocols TLSv1.2 TLSv1.3;\nssl_protocols TLSv1.3;",
            id="twice",
        ),
    ],
)
def test_nginx_check_fails_on_a_broken_site(tmp_path, certificate, original, broken):
    site = _site_with_certificate(NGINX_SITE.read_text(), certificate)
    assert not _nginx_accepts(_nginx_test(tmp_path, _replaced(site, {original: broken})))


def test_nginx_site_fits_the_gateway():
    directives = _nginx_directives(NGINX_SITE.read_text())
    https = next(d.context for d in directives if d.name == "listen" and "ssl" in d.arguments)
    unit = _unit_environment()
    # nginx reaches the gateway where the unit has it listen, from the one address the gateway trusts.
    assert _site_setting("server", ("upstream ollama_gateway",)) == (f"{unit['HOST']}:{unit['PORT']}",)
    # nginx lets go of an idle connection before the gateway closes it under nginx's next request.
    idle = int(_site_setting("keepalive_timeout", ("upstream ollama_gateway",))[0].removesuffix("s"))
    assert idle < UVICORN_KEEP_ALIVE
    assert unit["TRUSTED_PROXIES"] == unit["HOST"] == "127.0.0.1"
    # Replaced, never appended to: see core/client_address.py.
    forwarded = [
        d.arguments[1:]
        for d in directives
        if d.name == "proxy_set_header" and d.arguments[0] == "X-Forwarded-For"
    ]
    assert forwarded == [("$remote_addr",)]
    assert _site_setting("proxy_buffering", https) == ("off",)
    assert _site_setting("proxy_request_buffering", https) == ("off",)
    # nginx gives up on a silent upstream only after the gateway has (and has answered the client itself).
    read_timeout = int(_site_setting("proxy_read_timeout", https)[0].removesuffix("s"))
    assert read_timeout > _default("upstream_first_byte_timeout")
    assert read_timeout > _default("upstream_idle_timeout")
    # nginx stops no body the gateway allows; model blobs have no cap at either.
    body_cap = int(_site_setting("client_max_body_size", https)[0].removesuffix("m")) * MIB
    assert body_cap >= _default("max_request_mb") * MIB
    assert body_cap >= _default("max_upload_mb") * MIB + MULTIPART_ALLOWANCE
    assert _site_setting("client_max_body_size", (*https, "location /api/blobs/")) == ("0",)


def _replicas_site_for_this_machine() -> str:
    """nginx-replicas.conf as `nginx -t` can check it here: nginx resolves the upstreams' names as it reads
    them, and `gateway-1` ... resolve on compose's network only."""
    upstreams = [f"127.0.0.1:{8001 + number}" for number in range(len(_replica_services()))]
    return nginx_site("80", upstreams)


def test_nginx_replicas_site_passes_nginx_t(tmp_path):
    checked = _nginx_test(tmp_path, _replicas_site_for_this_machine())
    assert _nginx_accepts(checked), checked.stderr


@pytest.mark.parametrize(
    ("original", "broken"),
    [
        pytest.param(
            "proxy_next_upstream error timeout;", "proxy_next_upstream eror timeout;", id="bad-value"
        ),
        pytest.param("keepalive 32;", "keepalive 32;\n    keepalive 64;", id="twice"),
    ],
)
def test_nginx_check_fails_on_a_broken_replicas_site(tmp_path, original, broken):
    site = _replicas_site_for_this_machine()
    assert original in site
    assert not _nginx_accepts(_nginx_test(tmp_path, site.replace(original, broken, 1)))


def test_nginx_replicas_site_fits_the_gateway():
    directives = _nginx_directives(REPLICAS_SITE.read_text())
    upstream, server = ("upstream ollama_gateway_replicas",), ("server",)
    idle = int(_site_setting("keepalive_timeout", upstream, REPLICAS_SITE)[0].removesuffix("s"))
    assert idle < UVICORN_KEEP_ALIVE
    forwarded = [
        d.arguments[1:]
        for d in directives
        if d.name == "proxy_set_header" and d.arguments[0] == "X-Forwarded-For"
    ]
    assert forwarded == [("$remote_addr",)]
    assert _site_setting("proxy_buffering", server, REPLICAS_SITE) == ("off",)
    assert _site_setting("proxy_request_buffering", server, REPLICAS_SITE) == ("off",)
    # A stopping replica's refusal sends the request to the next; a request already sent is never resent.
    assert _site_setting("proxy_next_upstream", server, REPLICAS_SITE) == ("error", "timeout")
    read_timeout = int(_site_setting("proxy_read_timeout", server, REPLICAS_SITE)[0].removesuffix("s"))
    assert read_timeout > _default("upstream_first_byte_timeout")
    assert read_timeout > _default("upstream_idle_timeout")
    body_cap = int(_site_setting("client_max_body_size", server, REPLICAS_SITE)[0].removesuffix("m")) * MIB
    assert body_cap >= _default("max_request_mb") * MIB
    assert body_cap >= _default("max_upload_mb") * MIB + MULTIPART_ALLOWANCE
    assert _site_setting("client_max_body_size", (*server, "location /api/blobs/"), REPLICAS_SITE) == ("0",)


# Two clients: one on another machine (another loopback address, to differ from nginx's 127.0.0.1), and one
# on the gateway's own, whose address the gateway trusts as a proxy's. Each claims to be someone else.
OTHER_MACHINE = "127.0.0.2"
THIS_MACHINE = "127.0.0.1"
FORGED = "203.0.113.9"


@contextmanager
def _running_nginx(site: str) -> Iterator[tuple[int, int]]:
    """nginx with the site in the foreground, its two ports moved to free loopback ones; yields them."""
    http_port, https_port = free_port(), free_port()
    site = _replaced(
        site,
        {
            "listen 80;": f"listen 127.0.0.1:{http_port};",
            "listen [::]:80;": "",
            "listen 443 ssl;": f"listen 127.0.0.1:{https_port} ssl;",
            "listen [::]:443 ssl;": "",
        },
    )
    # Not under pytest's private temp folder: nginx started by root runs its worker as nobody.
    folder = Path(tempfile.mkdtemp(prefix="deploy-nginx-"))
    folder.chmod(0o755)
    conf = _nginx_conf(folder, site)
    command = [_tool("nginx"), "-p", str(folder), "-e", str(folder / "error.log"), "-c", str(conf)]
    process = subprocess.Popen([*command, "-g", "daemon off;"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {(folder / 'error.log').read_text()}") from None
                time.sleep(0.05)
        yield http_port, https_port
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def test_nginx_site_serves_the_gateway_as_the_unit_runs_it(tmp_path, ollama, certificate):
    """`python main.py` with the unit's settings, behind nginx with the site: TLS, the redirect from plain
    HTTP, tokens passed on one by one, and the client's own address reaching the gateway."""
    unit = _unit_environment()
    # The unit's own settings, but its data folder and port: the test's.
    assert set(unit) == {"DATA_DIR", "HOST", "PORT", "TRUSTED_PROXIES"}, (
        "a new setting in the unit: pass it on here"
    )
    gateway = running_main(
        tmp_path,
        HOST=unit["HOST"],
        TRUSTED_PROXIES=unit["TRUSTED_PROXIES"],
        DATA_DIR=str(tmp_path / "data"),
        OLLAMA_URL=ollama.url,
        ADMIN_PASSWORD=ADMIN_PASSWORD,
    )
    with gateway as (url, console, _):
        site = _site_with_certificate(NGINX_SITE.read_text(), certificate)
        site = _replaced(site, {"server 127.0.0.1:8000;": f"server {url.removeprefix('http://')};"})
        with _running_nginx(site) as (http_port, https_port):
            redirected = httpx.get(f"http://127.0.0.1:{http_port}/health?x=1")
            assert redirected.status_code == 301
            assert redirected.headers["location"] == "https://127.0.0.1/health?x=1"

            trusted = ssl.create_default_context(cafile=certificate.certificate)
            for failures, client in enumerate((OTHER_MACHINE, THIS_MACHINE), start=1):
                # A client's own X-Forwarded-For is replaced, not appended to: the gateway counts and logs
                # a failed sign-in against the address nginx saw. (Appended, the forged address would be
                # believed from the gateway's machine, the proxy's own address.)
                with _https_client(https_port, trusted, client) as http:
                    refused = http.post(
                        "/login",
                        json={"email": "admin@local", "password": "not the password"},
                        headers={"X-Forwarded-For": FORGED},
                    )
                    assert refused.status_code == 401
                assert _console_lines(console, "failed sign-in", failures)[-1].endswith(f"from {client}")
            assert FORGED not in console.read_text()

            with _https_client(https_port, trusted, OTHER_MACHINE) as http:
                health = http.get("/health")
                assert health.json()["status"] == "ok"
                assert "max-age" in health.headers["strict-transport-security"]

                signed_in = http.post("/login", json={"email": "admin@local", "password": ADMIN_PASSWORD})
                http.headers["Authorization"] = f"Bearer {signed_in.json()['access_token']}"
                # The fake model sends one token and then nothing: a relay that held it back until more
                # came, or the stream ended, would time out here.
                with http.stream("POST", "/api/chat", json=chat_body(hang_after=1)) as streamed:
                    first = json.loads(next(streamed.iter_lines()))
                assert first["message"]["content"] == "Hello"


def _https_client(port: int, trusted: ssl.SSLContext, local_address: str) -> httpx.Client:
    transport = httpx.HTTPTransport(verify=trusted, local_address=local_address)
    return httpx.Client(base_url=f"https://127.0.0.1:{port}", transport=transport, timeout=10)


def _console_lines(console: Path, text: str, count: int = 1) -> list[str]:
    """The console's lines holding `text`, once there are `count` of them (the gateway logs as it goes)."""
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in console.read_text().splitlines() if text in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# The Dockerfile.


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def _dockerfile() -> list[Instruction]:
    """Instructions with their continuation lines joined (comments inside them dropped, as Docker does)."""
    instructions, pending = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def _docker_arguments(keyword: str) -> list[str]:
    return [instruction.arguments for instruction in _dockerfile() if instruction.keyword == keyword]


def _dockerfile_environment() -> dict[str, str]:
    return dict(pair.split("=", 1) for arguments in _docker_arguments("ENV") for pair in arguments.split())


def _copied() -> set[str]:
    """What the image copies from the build context (the repository's root), as top-level names."""
    sources = [arguments.split()[:-1] for arguments in _docker_arguments("COPY")]
    return {source.rstrip("/") for group in sources for source in group}


def _hadolint(folder: Path, dockerfile: Path) -> subprocess.CompletedProcess[str]:
    # Every rule at every level, none silenced by a comment in the file, and no configuration from the
    # machine or the current folder: an empty one of ours.
    config = folder / "hadolint.yaml"
    config.write_text("ignored: []\n")
    hadolint = _tool("hadolint", str(Path(sys.executable).parent))
    command = [
        hadolint,
        "--no-color",
        "--failure-threshold",
        "style",
        "--disable-ignore-pragma",
        "-c",
        str(config),
    ]
    return _run([*command, str(dockerfile)], cwd=folder)


def test_dockerfile_passes_hadolint(tmp_path):
    linted = _hadolint(tmp_path, DOCKERFILE)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    assert linted.stdout.strip() == ""


@pytest.mark.parametrize(
    ("original", "broken"),
    [
        pytest.param("FROM python:3.11-slim-bookworm", "FROM python", id="untagged-base"),
        pytest.param("pip install --no-cache-dir", "pip install", id="pip-cache"),
        pytest.param("USER 10001:10001", "USER gateway", id="user-by-name"),
        pytest.param("WORKDIR /app", "RUN cd /app", id="cd-for-workdir"),
    ],
)
def test_hadolint_fails_on_a_broken_dockerfile(tmp_path, original, broken):
    text = DOCKERFILE.read_text()
    assert original in text
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text(text.replace(original, broken, 1))
    assert _hadolint(tmp_path, dockerfile).returncode != 0


def test_dockerfile_runs_the_gateway_as_its_settings_say():
    env = _dockerfile_environment()
    assert env["HOST"] == "0.0.0.0"
    assert _docker_arguments("EXPOSE") == [env["PORT"]]
    assert _docker_arguments("VOLUME") == [env["DATA_DIR"]]
    assert _docker_arguments("CMD") == ['["python", "main.py"]']
    (user,) = _docker_arguments("USER")
    assert user.split(":")[0] not in ("root", "0")
    (healthcheck,) = _docker_arguments("HEALTHCHECK")
    assert "/health" in healthcheck
    assert "os.environ['PORT']" in healthcheck
    # The runtime requirements, never the test tools.
    assert "requirements.txt" in _copied()
    assert not any(
        "requirements-" in arguments for arguments in _docker_arguments("RUN") + _docker_arguments("COPY")
    )


def _first_party_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {name for name in names if (REPO / name).is_dir() or (REPO / f"{name}.py").is_file()}


def test_dockerfile_copies_all_the_code_the_gateway_runs():
    copied = _copied()
    python_files = [
        path
        for name in copied
        for path in ((REPO / name).rglob("*.py") if (REPO / name).is_dir() else [REPO / name])
        if path.suffix == ".py"
    ]
    assert REPO / "main.py" in python_files
    imported = set().union(*(_first_party_imports(path) for path in python_files))
    # A top-level module is imported by its name (`services`) and copied as its file (`services.py`).
    assert imported - {name.removesuffix(".py") for name in copied} == set()
    assert "tests" not in imported and "bench" not in imported
    # The page and its scripts are served from files, not imported.
    assert WEB_DIR.relative_to(REPO).parts[0] in copied


def test_dockerignore_lets_through_everything_the_image_copies():
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip()]
    patterns = [line for line in lines if not line.startswith("#")]
    # Everything is left out first, then only what is named is let back in.
    assert patterns[0] == "*"
    admitted = {pattern.removeprefix("!").rstrip("/") for pattern in patterns if pattern.startswith("!")}
    assert _copied() <= admitted


# The compose file.


def _compose(path: Path = COMPOSE) -> dict:
    return yaml.safe_load(path.read_text())


def _compose_problems(compose: dict) -> list[str]:
    """What `docker compose config` would refuse: the schema, then the names one part gives another."""
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    problems = [
        f"{'.'.join(map(str, error.path))}: {error.message}" for error in validator.iter_errors(compose)
    ]
    if problems:
        return problems
    services = compose["services"]
    volumes = compose.get("volumes") or {}
    networks = compose.get("networks") or {}
    for name, service in services.items():
        for dependency in service.get("depends_on", []):
            if dependency not in services:
                problems.append(f"{name} depends on {dependency}, which is no service")
        for network in service.get("networks", []):
            if network not in networks:
                problems.append(f"{name} joins the network {network}, which is not declared")
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source.startswith("."):
                if not (COMPOSE.parent / source).exists():
                    problems.append(f"{name} mounts {source}, which is not there")
            elif not source.startswith("/") and source not in volumes:
                problems.append(f"{name} mounts the volume {source}, which is not declared")
        build = service.get("build")
        if build is not None:
            context = COMPOSE.parent / build["context"]
            if not (context / build.get("dockerfile", "Dockerfile")).is_file():
                problems.append(f"{name} builds from a Dockerfile that is not there")
    return problems


def test_compose_schema_is_a_valid_schema():
    jsonschema.Draft202012Validator.check_schema(json.loads(COMPOSE_SCHEMA.read_text()))


@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_REPLICAS], ids=lambda path: path.name)
def test_compose_file_matches_the_compose_specification(path):
    assert _compose_problems(_compose(path)) == []


def _broken_compose(change) -> dict:
    compose = _compose()
    change(compose)
    return compose


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda c: c["services"]["gateway"].update(stop_grace_periood="45s"), id="unknown-key"),
        pytest.param(lambda c: c["services"]["gateway"].update(ports=8000), id="ports-not-a-list"),
        pytest.param(lambda c: c["services"]["ollama"].update(restart=["always"]), id="restart-not-a-string"),
        pytest.param(lambda c: c["volumes"].pop("gateway-data"), id="undeclared-volume"),
        pytest.param(lambda c: c["services"]["gateway"].update(depends_on=["olama"]), id="unknown-service"),
        pytest.param(
            lambda c: c["services"]["gateway"]["build"].update(dockerfile="Dockerfile"), id="no-dockerfile"
        ),
    ],
)
def test_compose_check_fails_on_a_broken_file(change):
    assert _compose_problems(_broken_compose(change)) != []


def _broken_replicas(change) -> dict:
    compose = _compose(COMPOSE_REPLICAS)
    change(compose)
    return compose


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(
            lambda c: c["services"]["gateway-2"]["depends_on"]["gateway-1"].update(condition="service_ready"),
            id="unknown-condition",
        ),
        pytest.param(
            lambda c: c["services"]["nginx"]["depends_on"].update(
                {"gateway-4": {"condition": "service_healthy"}}
            ),
            id="unknown-service",
        ),
        pytest.param(
            lambda c: c["services"]["redis"]["healthcheck"].update(start_intervall="1s"), id="unknown-key"
        ),
        pytest.param(lambda c: c["networks"].pop("replicas"), id="undeclared-network"),
        pytest.param(
            lambda c: c["services"]["nginx"].update(
                volumes=["./nginx-replica.conf:/etc/nginx/conf.d/default.conf"]
            ),
            id="missing-file",
        ),
    ],
)
def test_compose_check_fails_on_a_broken_replicas_file(change):
    assert _compose_problems(_broken_replicas(change)) != []


def _seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", duration)
    assert match, duration
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_compose_runs_the_gateway_in_front_of_ollama():
    services = _compose()["services"]
    gateway, ollama = services["gateway"], services["ollama"]
    assert gateway["environment"]["OLLAMA_URL"] == "http://ollama:11434"
    # Ollama is reached only through the gateway.
    assert "ports" not in ollama
    (published,) = gateway["ports"]
    assert published.rsplit(":", 1)[1] == _dockerfile_environment()["PORT"]
    (data,) = gateway["volumes"]
    assert data.split(":")[1] == _dockerfile_environment()["DATA_DIR"]
    assert _seconds(gateway["stop_grace_period"]) > _default("graceful_shutdown_seconds")
    # The operator's own settings file is never committed by mistake.
    (env_file,) = gateway["env_file"]
    assert f"/deploy/{env_file['path']}" in (REPO / ".gitignore").read_text().splitlines()


def _replica_services() -> dict[str, dict]:
    services = _compose(COMPOSE_REPLICAS)["services"]
    return {name: service for name, service in services.items() if name.startswith("gateway-")}


def _condition(service: dict, dependency: str) -> str | None:
    return (service.get("depends_on") or {}).get(dependency, {}).get("condition")


def test_compose_replicas_share_one_database_redis_key_and_data_folder():
    replicas = _replica_services()
    assert sorted(replicas) == ["gateway-1", "gateway-2", "gateway-3"]
    first, *others = replicas.values()
    for replica in others:
        assert replica["environment"] == first["environment"]
        assert replica["volumes"] == first["volumes"]
        assert replica["build"] == first["build"]
        assert replica["image"] == first["image"]
    environment = first["environment"]
    assert environment["DATABASE_URL"].startswith("postgresql://")
    assert environment["DATABASE_URL"].endswith("@postgres:5432/gateway")
    assert environment["REDIS_URL"].startswith("redis://")
    assert environment["REDIS_URL"].endswith("@redis:6379/0")
    assert environment["OLLAMA_URL"] == "http://ollama:11434"
    (data,) = first["volumes"]
    assert data.split(":")[1] == _dockerfile_environment()["DATA_DIR"]
    assert _seconds(first["stop_grace_period"]) > _default("graceful_shutdown_seconds")


SECRET_NAMES = ("SECRET_KEY", "POSTGRES_PASSWORD", "REDIS_PASSWORD")


def test_compose_replicas_have_no_working_default_secret():
    text = COMPOSE_REPLICAS.read_text()
    # Every variable is required (`${NAME:?message}`: compose refuses to start without it); no default.
    used = re.findall(r"\$\{([A-Z_]+)([^}]*)\}", text)
    assert {name for name, _ in used} == set(SECRET_NAMES)
    assert all(rest.startswith(":?") for _, rest in used), used
    # The example leaves them empty, and the file they are written in is never committed.
    example = dict(re.findall(r"^([A-Z_]+)=(.*)$", REPLICAS_ENV_EXAMPLE.read_text(), flags=re.MULTILINE))
    assert {name: example.get(name) for name in SECRET_NAMES} == dict.fromkeys(SECRET_NAMES, "")
    for replica in _replica_services().values():
        (env_file,) = replica["env_file"]
        assert env_file["required"] is True
        assert f"/deploy/{env_file['path']}" in (REPO / ".gitignore").read_text().splitlines()


def test_compose_replicas_start_in_order_once_what_they_need_is_healthy():
    services = _compose(COMPOSE_REPLICAS)["services"]
    replicas = _replica_services()
    for name, replica in replicas.items():
        assert _condition(replica, "postgres") == "service_healthy"
        assert _condition(replica, "redis") == "service_healthy"
        # The first replica alone creates the tables and the first admin; the others wait for it.
        if name != "gateway-1":
            assert _condition(replica, "gateway-1") == "service_healthy"
    assert _condition(replicas["gateway-1"], "ollama") == "service_healthy"
    assert {name: _condition(services["nginx"], name) for name in replicas} == dict.fromkeys(
        replicas, "service_healthy"
    )
    # What is waited for has a health check to wait on.
    waited_for = {dependency for service in services.values() for dependency in service.get("depends_on", {})}
    for name in waited_for:
        assert services[name]["healthcheck"]["test"], name


def test_compose_replicas_are_reached_through_nginx_alone():
    compose = _compose(COMPOSE_REPLICAS)
    services = compose["services"]
    assert [name for name, service in services.items() if "ports" in service] == ["nginx"]
    nginx = services["nginx"]
    (published,) = nginx["ports"]
    assert published.rsplit(":", 1)[1] == _site_setting("listen", ("server",), REPLICAS_SITE)[0]
    (conf,) = nginx["volumes"]
    source, target, mode = conf.split(":")
    assert (COMPOSE_REPLICAS.parent / source).resolve() == REPLICAS_SITE
    assert (target, mode) == ("/etc/nginx/conf.d/default.conf", "ro")
    # nginx balances exactly the replicas, at the port the image has them listen on.
    servers = [
        d.arguments
        for d in _nginx_directives(REPLICAS_SITE.read_text())
        if d.context == ("upstream ollama_gateway_replicas",) and d.name == "server"
    ]
    port = _dockerfile_environment()["PORT"]
    assert servers == [(f"{name}:{port}",) for name in _replica_services()]
    # The replicas believe X-Forwarded-For from nginx's fixed address alone, on the set's own network.
    nginx_address = nginx["networks"]["replicas"]["ipv4_address"]
    (subnet,) = compose["networks"]["replicas"]["ipam"]["config"]
    for replica in _replica_services().values():
        assert replica["environment"]["TRUSTED_PROXIES"] == nginx_address
        assert ipaddress.ip_address(replica["networks"]["replicas"]["ipv4_address"]) in ipaddress.ip_network(
            subnet["subnet"]
        )
    assert ipaddress.ip_address(nginx_address) in ipaddress.ip_network(subnet["subnet"])


# Every file against the settings.


def _names_in(path: Path) -> set[str]:
    return set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", path.read_text(), flags=re.MULTILINE))


def _names_in_env_example() -> set[str]:
    return _names_in(ENV_EXAMPLE)


@pytest.mark.parametrize(
    "names",
    [
        pytest.param(lambda: set(_unit_environment()), id="systemd-unit"),
        pytest.param(lambda: set(_dockerfile_environment()), id="dockerfile"),
        pytest.param(lambda: set(_compose()["services"]["gateway"]["environment"]), id="compose"),
        pytest.param(_names_in_env_example, id="env-example"),
        pytest.param(
            lambda: set().union(*(replica["environment"] for replica in _replica_services().values())),
            id="compose-replicas",
        ),
        pytest.param(
            lambda: _names_in(REPLICAS_ENV_EXAMPLE) - {"POSTGRES_PASSWORD", "REDIS_PASSWORD"},
            id="replicas-env-example",
        ),
    ],
)
def test_deploy_files_set_only_gateway_settings(names):
    found = names()
    assert found
    assert found - SETTING_NAMES == set()
