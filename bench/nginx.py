"""nginx as the reference relay: a generated config in a temp dir, run as a foreground process.

Configured as a streaming reverse proxy should be (`proxy_buffering off`, HTTP/1.1 with pooled upstream
connections) and like the gateway gets to run: one worker process.
"""

import contextlib
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from bench.nginx_conf import folder_conf
from bench.procs import HOST, free_port, spawn, stop, wait_for_port

# The relay itself, inside nginx_conf's http block. With several upstream servers, nginx balances them
# round-robin (its default).
HTTP = """\
upstream ollama {{
{servers}
    keepalive 1024;
}}

server {{
    listen {host}:{port} backlog=4096;

    location / {{
        proxy_pass http://ollama;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_read_timeout 600s;
    }}
}}
"""


def executable() -> str:
    # Debian puts nginx in /usr/sbin, which is not on every user's PATH.
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError("nginx is not installed: run bench/run.sh, which installs it")
    return found


def version() -> str:
    return subprocess.run([executable(), "-v"], capture_output=True, text=True).stderr.strip()


@contextlib.contextmanager
def run_nginx(upstream_ports: list[int]) -> Iterator[tuple[int, list[psutil.Process]]]:
    """Yields nginx's port and its worker process, which does all the relaying, to the upstreams listening
    on `upstream_ports`."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-nginx-"))
    # nginx started by root runs its worker as nobody, which must reach the temp paths.
    tmp.chmod(0o755)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        folder_conf(
            tmp,
            HTTP.format(
                host=HOST,
                port=port,
                servers="\n".join(f"    server {HOST}:{upstream};" for upstream in upstream_ports),
            ),
            worker_connections=4096,
            main=f"worker_rlimit_nofile {resource.getrlimit(resource.RLIMIT_NOFILE)[1]};",
        )
    )
    proc = spawn(
        [executable(), "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(conf), "-g", "daemon off;"]
    )
    try:
        wait_for_port(port, proc, timeout=10)
        yield port, _workers(proc)
    finally:
        stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _workers(proc: subprocess.Popen) -> list[psutil.Process]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        workers = psutil.Process(proc.pid).children()
        if workers:
            return workers
        time.sleep(0.05)
    raise RuntimeError("nginx started no worker process")
