"""Several gateway replicas as they run in production, on loopback: N `python main.py` processes sharing one
Postgres database (and one Redis, when given REDIS_URL), nginx balancing them with deploy/nginx-replicas.conf,
and M test Ollama hosts (tests/fake_ollama.py) that every replica has in OLLAMA_URL.

`running_cluster()` makes a throwaway database on TEST_POSTGRES_URL's server (tests/with_postgres.sh sets it),
starts the set, and stops everything when its block ends, however it ends. A test talks through nginx
(`url`) or to one replica (`replicas[i].url`), kills a replica (`kill`, SIGKILL), stops it as a service
manager does (`stop`, SIGTERM, then it drains) and starts it again on the same port (`start`), and reads
each test Ollama's counters (`most_in_flight(model)`: the most requests each host ran at once; by default a
host runs every request it is sent at once, so that is also the most the replicas together sent it;
`most_sent(model)`: the most each host was sent at once, running or waiting in its hidden queue, whatever
its own slots). nginx names the replica that served each answer in `X-Gateway-Upstream` (`served_by`).
`Load` keeps client threads sending requests, through nginx or to one replica, and records how each ended;
`new_person` makes someone to send them as; `metrics` reads a replica's /metrics.

Every process is started so that the kernel kills it if the process that started it dies (a test run killed
by a timeout leaves nothing running), and nginx runs as a single process for the same reason (a worker
outlives a killed master).

For people: `make cluster` (`python -m tests.cluster`) starts 3 replicas, nginx and 2 test Ollama hosts in
the foreground, prints the addresses and an admin's sign-in, and stops everything on Ctrl-C.
"""

import argparse
import contextlib
import ctypes
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import NullPool, create_engine, text
from sqlalchemy.engine import make_url

from bench.nginx_conf import folder_conf
from tests import databases
from tests.fake_ollama import FakeOllama
from tests.processes import REPO, clean_environment, free_port

REPLICAS_SITE = REPO / "deploy" / "nginx-replicas.conf"
UPSTREAM_HEADER = "X-Gateway-Upstream"
ADMIN_EMAIL = "admin@local"
START_SECONDS = 30.0
# What a replica gets to finish running requests on SIGTERM, and how long `stop` waits for it beyond that.
GRACEFUL_SHUTDOWN_SECONDS = 10
STOP_MARGIN_SECONDS = 10.0

_LIBC = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Run in the child before it executes: the kernel sends it SIGKILL when its parent ends (Linux)."""
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent ended before the request was made
        os._exit(1)


def _spawn(command: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    parent = os.getpid()
    # A session of its own: Ctrl-C in `make cluster`'s terminal reaches this process alone, which then stops
    # the others in order.
    return subprocess.Popen(
        command, preexec_fn=lambda: _die_with_parent(parent), start_new_session=True, **kwargs
    )


def _end(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`; its exit status."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


class Replica:
    """One `python main.py`, always on the same port, so that nginx finds it again after a restart."""

    def __init__(self, name: str, folder: Path, environment: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.folder = folder
        self.console = folder / "console.txt"
        self._environment = environment
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """As nginx names it in $upstream_addr."""
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self, wait: bool = True) -> None:
        if self.running():
            raise RuntimeError(f"{self.name} is already running")
        with open(self.console, "ab") as console:
            self.process = _spawn(
                [sys.executable, str(REPO / "main.py")],
                cwd=self.folder,
                env=self._environment | {"PORT": str(self.port)},
                stdout=console,
                stderr=subprocess.STDOUT,
            )
        if wait:
            self.wait_until_serving()

    def wait_until_serving(self, timeout: float = START_SECONDS) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if not self.running() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.console.read_text()[-4000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye; its connections are closed by the kernel."""
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> int:
        """SIGTERM, as systemd and Docker stop a service: it stops listening, lets what runs finish (up to
        GRACEFUL_SHUTDOWN_SECONDS), then exits. Its exit status (0: a clean stop)."""
        assert self.process is not None
        return _end(self.process, GRACEFUL_SHUTDOWN_SECONDS + STOP_MARGIN_SECONDS)

    def restart(self) -> None:
        self.stop()
        self.start()


def nginx_site(listen: str, upstreams: list[str], *, name_the_upstream: bool = False) -> str:
    """deploy/nginx-replicas.conf with `listen` for its port and `upstreams` for its replicas.
    `name_the_upstream`: every answer says which replica served it (`X-Gateway-Upstream`)."""
    site = REPLICAS_SITE.read_text()
    servers = re.findall(r"^ *server gateway-\d+:8000;\n", site, flags=re.MULTILINE)
    if not servers or "    listen 80;\n" not in site:
        raise RuntimeError(f"{REPLICAS_SITE.name} changed: update tests/cluster.py's nginx_site")
    ours = "".join(f"    server {upstream};\n" for upstream in upstreams)
    site = site.replace(servers[0], ours, 1)
    for server in servers[1:]:
        site = site.replace(server, "", 1)
    header = f"    add_header {UPSTREAM_HEADER} $upstream_addr always;\n" if name_the_upstream else ""
    return site.replace("    listen 80;\n", f"    listen {listen};\n{header}", 1)


class Nginx:
    """nginx from a folder of its own (bench.nginx_conf), in the foreground, as one process."""

    def __init__(self, port: int, upstreams: list[str]) -> None:
        self.port = port
        # Not under pytest's private temp folder: nginx started by root may switch to nobody.
        self.folder = Path(tempfile.mkdtemp(prefix="cluster-nginx-"))
        self.folder.chmod(0o755)
        site = self.folder / "replicas.conf"
        site.write_text(nginx_site(f"127.0.0.1:{port}", upstreams, name_the_upstream=True))
        self.conf = self.folder / "nginx.conf"
        self.conf.write_text(folder_conf(self.folder, f"include {site};", worker_connections=4096))
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        folder = str(self.folder)
        command = [_nginx(), "-p", folder, "-e", f"{folder}/error.log", "-c", str(self.conf)]
        self.process = _spawn([*command, "-g", "daemon off; master_process off;"], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {self.error_log()}") from None
                time.sleep(0.05)

    def error_log(self) -> str:
        log = self.folder / "error.log"
        return log.read_text() if log.exists() else ""

    def close(self) -> None:
        if self.process is not None:
            _end(self.process, 10)
        shutil.rmtree(self.folder, ignore_errors=True)


def _nginx() -> str:
    # Debian puts nginx in /usr/sbin, which is not on every user's PATH.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/local/sbin:/usr/sbin")
    if found is None:
        raise RuntimeError("nginx is not installed: `make deploy-tools` installs it")
    return found


class Cluster:
    """The running set; made by `running_cluster`."""

    def __init__(
        self,
        folder: Path,
        database_url: str,
        *,
        replicas: int,
        hosts: int,
        slots: int | None,
        host_slots: int | None,
        redis_url: str | None,
        settings: dict[str, str],
        port: int | None,
    ) -> None:
        self.folder = folder
        self.database_url = database_url
        self.redis_url = redis_url
        self.slots = slots
        self.admin_email = ADMIN_EMAIL
        self.admin_password = secrets.token_urlsafe(16)
        self.hosts = [FakeOllama(num_parallel=host_slots) for _ in range(hosts)]
        self._replicas = replicas
        self._settings = settings
        self._port = port
        self.replicas: list[Replica] = []
        self.nginx: Nginx | None = None
        self._admin_token: str | None = None

    @property
    def url(self) -> str:
        """nginx: the way in."""
        assert self.nginx is not None
        return f"http://127.0.0.1:{self.nginx.port}"

    def start(self, stack: contextlib.ExitStack) -> None:
        """Start everything, each piece's end put on `stack` as soon as it has started."""
        for host in self.hosts:
            host.start()
            stack.callback(host.stop)
        environment = self._environment()
        for number in range(1, self._replicas + 1):
            name = f"gateway-{number}"
            self.replicas.append(Replica(name, self.folder / name, environment))
        stack.callback(self._stop_replicas)
        # The first alone: it creates the schema and the first admin. Replicas started together on an empty
        # database would each run the migrations at once.
        first, *others = self.replicas
        first.start()
        for replica in others:
            replica.start(wait=False)
        for replica in others:
            replica.wait_until_serving()
        self.nginx = Nginx(self._port or free_port(), [replica.address for replica in self.replicas])
        stack.callback(self.nginx.close)
        self.nginx.start()

    def _environment(self) -> dict[str, str]:
        settings = {
            "HOST": "127.0.0.1",
            "OLLAMA_URL": ",".join(host.url for host in self.hosts),
            "DATABASE_URL": self.database_url,
            # One signing key for all: a token from one replica is good on every other. Uploads in one
            # folder for all, as the README asks of replicas.
            "SECRET_KEY": secrets.token_urlsafe(48),
            "DATA_DIR": str(self.folder / "data"),
            "ADMIN_EMAIL": self.admin_email,
            "ADMIN_PASSWORD": self.admin_password,
            # nginx forwards each client's address; clients talking to a replica directly may name one too.
            "TRUSTED_PROXIES": "127.0.0.1",
            "GRACEFUL_SHUTDOWN_SECONDS": str(GRACEFUL_SHUTDOWN_SECONDS),
        }
        if self.slots is not None:
            settings["OLLAMA_PARALLEL"] = str(self.slots)
        environment = clean_environment(**(settings | self._settings))
        # The Redis this set was given, never one the caller's environment happens to name.
        environment.pop("REDIS_URL", None)
        if self.redis_url is not None:
            environment["REDIS_URL"] = self.redis_url
        return environment

    def _stop_replicas(self) -> None:
        for replica in self.replicas:
            if replica.running():
                assert replica.process is not None
                replica.process.terminate()
        for replica in self.replicas:
            if replica.process is not None:
                _end(replica.process, GRACEFUL_SHUTDOWN_SECONDS + STOP_MARGIN_SECONDS)

    def start_stopped(self) -> None:
        """Start again every replica that is not running (one a test killed or stopped)."""
        stopped = [replica for replica in self.replicas if not replica.running()]
        for replica in stopped:
            replica.start(wait=False)
        for replica in stopped:
            replica.wait_until_serving()

    def served_by(self, response: httpx.Response) -> Replica | None:
        """The replica that answered through nginx: the last one nginx tried (it names each it tried)."""
        tried = response.headers.get(UPSTREAM_HEADER, "")
        last = re.split(r"[,:] ", tried)[-1].strip() if tried else ""
        return next((replica for replica in self.replicas if replica.address == last), None)

    def admin_headers(self) -> dict[str, str]:
        """Bearer for the first admin, signed in once through nginx (a token is good on every replica)."""
        if self._admin_token is None:
            answer = httpx.post(
                f"{self.url}/login", json={"email": self.admin_email, "password": self.admin_password}
            )
            answer.raise_for_status()
            self._admin_token = answer.json()["access_token"]
        return {"Authorization": f"Bearer {self._admin_token}"}

    def most_in_flight(self, model: str) -> dict[str, int]:
        """For each test Ollama host (by URL), the most requests for `model` it has run at once."""
        return {host.url: host.model_stats(model).max_in_flight for host in self.hosts}

    def most_sent(self, model: str) -> dict[str, int]:
        """For each test Ollama host (by URL), the most requests for `model` it was sent at once: running,
        or waiting in its hidden queue when its own slots (`host_slots`) were all taken."""
        return {host.url: host.model_stats(model).max_sent for host in self.hosts}

    def new_person(self, via: "Replica") -> "Person":
        """A new account, made by the admin through `via`, signed in there."""
        email = f"{secrets.token_hex(4)}@cluster.test"
        password = secrets.token_urlsafe(12)
        account = {"email": email, "password": password}
        made = httpx.post(f"{via.url}/admin/users", json=account, headers=self.admin_headers())
        made.raise_for_status()
        signed_in = httpx.post(f"{via.url}/login", json=account)
        signed_in.raise_for_status()
        return Person(made.json()["id"], email, password, signed_in.json()["access_token"])

    def metrics(self, replica: "Replica") -> dict[str, float]:
        """`replica`'s /metrics samples that have no labels, by name."""
        answer = httpx.get(f"{replica.url}/metrics", headers=self.admin_headers(), timeout=10)
        answer.raise_for_status()
        samples: dict[str, float] = {}
        for line in answer.text.splitlines():
            found = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)", line)
            if found:
                samples[found[1]] = float(found[2])
        return samples

    def query(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple]:
        """Rows of one statement on the replicas' database, read from outside them."""
        return _execute(self.database_url, sql, params)


@dataclass
class Person:
    id: int
    email: str
    password: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class Outcome:
    started: float
    ended: float
    replica: Replica | None
    ok: bool
    detail: str
    first_byte: float | None = None  # seconds from sending to the first line


class Load:
    """Client threads sending requests one after another, until stopped (or `limit` seconds): each
    request's start, end, which replica served it and whether it fully succeeded. Through nginx as the
    admin by default; `to` sends them to one replica, `headers` as someone else (or as a batch job)."""

    def __init__(
        self,
        cluster: Cluster,
        clients: int,
        body: dict,
        limit: float = 60.0,
        *,
        to: Replica | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.body = body
        self.outcomes: list[Outcome] = []
        self._url = cluster.url if to is None else to.url
        self._to = to
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + limit
        self._headers = cluster.admin_headers() if headers is None else headers
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def __enter__(self) -> "Load":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _client(self) -> None:
        with httpx.Client(base_url=self._url, headers=self._headers, timeout=30) as http:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                started = time.monotonic()
                outcome = self._one(http, started)
                with self._lock:
                    self.outcomes.append(outcome)

    def _one(self, http: httpx.Client, started: float) -> Outcome:
        response: httpx.Response | None = None
        first_byte: float | None = None
        try:
            with http.stream("POST", "/api/chat", json=self.body) as response:
                lines = []
                for line in response.iter_lines():
                    if first_byte is None:
                        first_byte = time.monotonic() - started
                    lines.append(json.loads(line))
            ok = response.status_code == 200 and bool(lines) and lines[-1].get("done") is True
            detail = f"{response.status_code} {lines[-1:]}"
        except (httpx.HTTPError, ValueError) as error:
            ok, detail = False, repr(error)
        replica = self._to if response is None or self._to is not None else self.cluster.served_by(response)
        return Outcome(started, time.monotonic(), replica, ok, detail, first_byte)

    def served(self, since: float) -> set[Replica | None]:
        return {outcome.replica for outcome in self.outcomes if outcome.started >= since and outcome.ok}

    def wait_until_served_by(self, replica: Replica, since: float, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while replica not in self.served(since):
            assert time.monotonic() < deadline, f"nginx sent nothing to {replica.name} again"
            time.sleep(0.1)


def _postgres(url: str) -> str:
    return make_url(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def _execute(url: str, sql: str, params: dict[str, Any] | None = None, *, autocommit: bool = False) -> list:
    options: dict[str, Any] = {"isolation_level": "AUTOCOMMIT"} if autocommit else {}
    engine = create_engine(_postgres(url), poolclass=NullPool, **options)
    try:
        with engine.begin() as conn:
            result = conn.execute(text(sql), params or {})
            return [tuple(row) for row in result] if result.returns_rows else []
    finally:
        engine.dispose()


@contextlib.contextmanager
def throwaway_database(server: str | None = None) -> Iterator[str]:
    """A new database on the Postgres server (TEST_POSTGRES_URL's by default), dropped afterwards; yields its
    URL, as DATABASE_URL takes it."""
    server_url = make_url(server or databases.SERVER)
    name = f"gateway_cluster_{secrets.token_hex(4)}"
    _execute(str(server_url), f'CREATE DATABASE "{name}"', autocommit=True)
    try:
        yield server_url.set(database=name).render_as_string(hide_password=False)
    finally:
        _execute(str(server_url), f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', autocommit=True)


@contextlib.contextmanager
def running_cluster(
    folder: Path,
    *,
    replicas: int = 3,
    hosts: int = 2,
    slots: int | None = None,
    host_slots: int | None = None,
    redis_url: str | None = None,
    settings: dict[str, str] | None = None,
    port: int | None = None,
    postgres: str | None = None,
) -> Iterator[Cluster]:
    """`replicas` gateways behind nginx, in front of `hosts` test Ollama hosts, on a throwaway database of
    `postgres`'s server. `slots`: what the replicas are told each host runs at once per model
    (OLLAMA_PARALLEL; None: they learn it). `host_slots`: what each host really runs at once (its
    OLLAMA_NUM_PARALLEL; the rest wait in its hidden queue); None: all it is sent. `settings`: more gateway
    settings, by their environment names. `port`: nginx's (default: a free one)."""
    with throwaway_database(postgres) as database_url, contextlib.ExitStack() as stack:
        cluster = Cluster(
            folder,
            database_url,
            replicas=replicas,
            hosts=hosts,
            slots=slots,
            host_slots=host_slots,
            redis_url=redis_url,
            settings=settings or {},
            port=port,
        )
        cluster.start(stack)
        yield cluster


def _redis_answers(host: str = "127.0.0.1", port: int = 6379) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _serve(arguments: argparse.Namespace) -> None:
    redis_url = os.environ.get("REDIS_URL") or ("redis://127.0.0.1:6379/0" if _redis_answers() else None)
    folder = Path(tempfile.mkdtemp(prefix="gateway-cluster-"))
    try:
        with running_cluster(
            folder,
            replicas=arguments.replicas,
            hosts=arguments.hosts,
            slots=arguments.slots,
            host_slots=arguments.slots,
            redis_url=redis_url,
            port=arguments.port,
        ) as cluster:
            hosts = f"{arguments.hosts} test Ollama hosts"
            lines = [
                f"ollama-gateway: {arguments.replicas} replicas behind nginx, {hosts}",
                f"  nginx        {cluster.url}    (the way in)",
                *(f"  {r.name:<12} {r.url}    (pid {r.pid}, log {r.console})" for r in cluster.replicas),
                *(
                    f"  ollama-{n:<5} {host.url}    (test Ollama, {arguments.slots} slots per model)"
                    for n, host in enumerate(cluster.hosts, start=1)
                ),
                f"  postgres     {make_url(cluster.database_url).render_as_string(hide_password=True)}",
                f"  redis        {redis_url or 'none answers on 127.0.0.1:6379: not used'}",
                f"  admin        {cluster.admin_email}  password: {cluster.admin_password}",
                "Ctrl-C stops everything.",
            ]
            print("\n".join(lines), flush=True)
            reported: set[str] = set()
            while True:
                time.sleep(1)
                for replica in cluster.replicas:
                    if not replica.running() and replica.name not in reported:
                        reported.add(replica.name)
                        print(f"{replica.name} exited; its log: {replica.console}", flush=True)
    except KeyboardInterrupt:
        print("\nstopping", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--hosts", type=int, default=2, help="test Ollama hosts")
    parser.add_argument("--slots", type=int, default=2, help="requests each host runs at once per model")
    parser.add_argument("--port", type=int, default=8080, help="nginx's port on 127.0.0.1")
    # Ctrl-C, and a service manager's SIGTERM, end the set in order; even when started with SIGINT ignored
    # (in the background of a script), where Python would leave it so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    _serve(parser.parse_args())


if __name__ == "__main__":
    main()
