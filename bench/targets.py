"""The three ways the load client reaches the fake upstream: directly, through nginx, through the gateway."""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.gateway import run_gateway
from bench.nginx import run_nginx
from bench.procs import HOST

NAMES = ("direct", "nginx", "gateway")


@dataclass
class Target:
    name: str
    port: int
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    # The processes doing the relaying, whose CPU and memory the bench reads; none for direct.
    relay: list[psutil.Process] = field(default_factory=list)

    def spec(self) -> dict:
        """How the load client addresses this target."""
        return {"host": HOST, "port": self.port, "path": self.path, "headers": self.headers}


@dataclass
class Baseline:
    """An earlier version of the gateway to run beside this one: its short hash and its unpacked files."""

    name: str
    root: Path


@contextlib.contextmanager
def open_targets(
    names: list[str], upstream_port: int, baseline: Baseline | None = None
) -> Iterator[list[Target]]:
    """Starts fresh relays for the named targets, in the given order, and stops them afterwards; with a
    baseline, the earlier gateway too, right after this one."""
    with contextlib.ExitStack() as stack:
        targets = []
        for name in names:
            if name == "direct":
                targets.append(Target("direct", upstream_port, "/api/chat"))
            elif name == "nginx":
                port, workers = stack.enter_context(run_nginx(upstream_port))
                targets.append(Target("nginx", port, "/api/chat", relay=workers))
            elif name == "gateway":
                port, token, processes = stack.enter_context(run_gateway(upstream_port))
                auth = {"Authorization": f"Bearer {token}"}
                targets.append(Target("gateway", port, "/chat", headers=auth, relay=processes))
                if baseline is not None:
                    earlier = run_gateway(upstream_port, root=baseline.root)
                    port, token, processes = stack.enter_context(earlier)
                    auth = {"Authorization": f"Bearer {token}"}
                    name = f"gateway {baseline.name}"
                    targets.append(Target(name, port, "/chat", headers=auth, relay=processes))
        yield targets
