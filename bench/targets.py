"""The ways the load client reaches the fake upstream(s): directly, through nginx, through the gateway (as
deployed by default, or told its hosts' slots, so that its fair queue admits every model call)."""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from bench.gateway import run_gateway
from bench.nginx import run_nginx
from bench.procs import HOST, REPO_ROOT

NAMES = ("direct", "nginx", "gateway", "gateway-admitted")
# The gateway-admitted target is told each host runs this many requests at once per model (OLLAMA_PARALLEL):
# above the load of every scenario, so its fair queue admits each model call at once, slots known and
# counted. What it measures is what admission costs on the relay's path. Raised to the load when a scenario
# asks for more (Bench.admitted_slots).
ADMITTED_PARALLEL = 1000


@dataclass
class Target:
    name: str
    port: int
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    # The processes doing the relaying, whose CPU and memory the bench reads; none for direct.
    relay: list[psutil.Process] = field(default_factory=list)
    # A gateway's admin token (to make API keys, to add people); None for the others.
    admin_token: str | None = None

    def spec(self, headers: dict[str, str] | None = None) -> dict:
        """How the load client addresses this target (with other headers than its own, if given)."""
        return {
            "host": HOST,
            "port": self.port,
            "path": self.path,
            "headers": self.headers if headers is None else headers,
        }


@dataclass
class Baseline:
    """An earlier version of the gateway to run beside this one: its short hash and its unpacked files."""

    name: str
    root: Path


@contextlib.contextmanager
def open_targets(
    names: list[str],
    upstream_ports: list[int],
    baseline: Baseline | None = None,
    *,
    gateway_parallel: int | None = None,
    admitted_parallel: int = ADMITTED_PARALLEL,
) -> Iterator[list[Target]]:
    """Starts fresh relays for the named targets, in the given order, in front of the upstreams listening on
    `upstream_ports` (direct: the first of them), and stops them afterwards; with a baseline, the earlier
    gateway too, right after this one. `gateway_parallel` is OLLAMA_PARALLEL for the gateway target (None:
    unset, as by default); gateway-admitted is told `admitted_parallel`."""
    with contextlib.ExitStack() as stack:
        targets = []

        def gateway(name: str, parallel: int | None, root: Path = REPO_ROOT) -> None:
            settings = {} if parallel is None else {"OLLAMA_PARALLEL": str(parallel)}
            port, token, processes = stack.enter_context(run_gateway(upstream_ports, settings, root=root))
            auth = {"Authorization": f"Bearer {token}"}
            targets.append(Target(name, port, "/chat", headers=auth, relay=processes, admin_token=token))

        for name in names:
            if name == "direct":
                targets.append(Target("direct", upstream_ports[0], "/api/chat"))
            elif name == "nginx":
                port, workers = stack.enter_context(run_nginx(upstream_ports))
                targets.append(Target("nginx", port, "/api/chat", relay=workers))
            elif name == "gateway":
                gateway("gateway", gateway_parallel)
                if baseline is not None:
                    gateway(f"gateway {baseline.name}", gateway_parallel, baseline.root)
            elif name == "gateway-admitted":
                gateway("gateway-admitted", admitted_parallel)
        yield targets
