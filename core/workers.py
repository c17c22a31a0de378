"""How many worker processes share this gateway's port, as the program that started this one was told:
`uvicorn --workers N`, gunicorn's `-w N` / `--workers N`, or WEB_CONCURRENCY (which both read).

Each worker is a gateway of its own: its own slots, fair queue, caps and quota counts. Without Redis to share
them (REDIS_URL), N workers let through N times every limit, silently (issue 14). So the gateway refuses to
start as one of several workers without REDIS_URL, in one line (`require_shared_state`).

Only the parent's own command line and environment are read (Linux' /proc): another way of starting several
copies (a process manager, several services on one database) is not seen; the README says so.
"""

import os
from pathlib import Path

from core.settings import ConfigurationError, Settings

SERVERS = ("uvicorn", "gunicorn")
WORKER_FLAGS = ("--workers", "-w")


def workers_started_with(argv: list[str], environment: dict[str, str]) -> int:
    """The worker count a uvicorn or gunicorn command line asks for (1 for any other program)."""
    if not any(Path(arg).name.startswith(SERVERS) or arg.startswith(SERVERS) for arg in argv[:3]):
        return 1
    count = environment.get("WEB_CONCURRENCY")
    for number, arg in enumerate(argv):
        if arg in WORKER_FLAGS and number + 1 < len(argv):
            count = argv[number + 1]
        elif arg.startswith("--workers="):
            count = arg.removeprefix("--workers=")
        elif arg.startswith("-w") and arg[2:].isdigit():
            count = arg[2:]
    try:
        return max(int(count), 1) if count is not None else 1
    except ValueError:
        return 1


def _parent_command() -> tuple[list[str], dict[str, str]]:
    proc = Path("/proc") / str(os.getppid())
    try:
        argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        pairs = (proc / "environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # not Linux, or not allowed to read it: nothing known
        return [], {}
    environment = dict(pair.split("=", 1) for pair in pairs if "=" in pair)
    return [arg for arg in argv if arg], environment


def require_shared_state(settings: Settings) -> None:
    """Refuse to run as one of several workers with nothing shared between them."""
    if settings.redis_url:
        return
    workers = workers_started_with(*_parent_command())
    if workers > 1:
        raise ConfigurationError(
            f"{workers} workers without REDIS_URL: each would keep its own slots, queue, caps and quota "
            f"counts, letting through {workers} times every limit; set REDIS_URL, or run one worker"
        )
