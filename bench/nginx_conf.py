"""nginx run from a folder of its own rather than as installed: the nginx.conf that keeps every file it
writes (pid, error log, the spools of request and response bodies) in that folder, so it needs neither root
nor /var. The benchmark's reference relay (`bench.nginx`) and the deploy tests' nginx in front of the
gateway (`tests/test_deploy.py`) run it so, each with its own `http` block.
"""

import textwrap
from pathlib import Path


def folder_conf(folder: Path, http: str, *, worker_connections: int, main: str = "") -> str:
    """nginx.conf for an nginx run in `folder`, one worker process: `main` is added to the main context,
    `http` to the http block."""
    main_lines = f"{main}\n" if main else ""
    return f"""\
worker_processes 1;
{main_lines}pid {folder}/nginx.pid;
error_log {folder}/error.log warn;

events {{
    worker_connections {worker_connections};
}}

http {{
    access_log off;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
{textwrap.indent(http.rstrip(), "    ")}
}}
"""
