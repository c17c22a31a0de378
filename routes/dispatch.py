"""Which Ollama host a relayed request goes to, and the admission of every request that runs a model.

- A model call (`/chat`, `/api/chat`, `/api/generate`, `/api/embed`, `/api/embeddings`, and `/v1`'s) gets a
  slot from the fleet's fair queue (fleet.admission), waiting for one if need be. A client that goes away
  while it waits leaves the queue at once, and its request never reaches Ollama. Refused, it is answered 429
  (a cap) or 503 (waited too long), with Retry-After, in the surface's error shape (core.errors).
- Failover: if the host fails the request before any answer (no connection; Ollama's 503 "server busy"), the
  request goes once to another host that can take it. Never after bytes were relayed: then the stream ends
  with an error line, as for a single host.
- The slot is given back when the answer ends, however it ends, with Ollama's counters from its last bytes
  (upstream.counters): they correct the person's fair share, and teach the slots of a host nobody set.
- Other calls that name a model (`/api/show`, `/v1/models/{model}`) go to a host that holds it; model
  management to the host an admin names (`X-Ollama-Host`), or to the only host.
"""

import asyncio
import random
import time
from dataclasses import replace
from functools import partial
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import Receive

from core.errors import GatewayError
from fleet.admission import Ended, Fleet
from fleet.health import FAST_FAILURE_SECONDS
from fleet.hosts import Host
from fleet.scheduler import Ask, Grant, Refused
from upstream.client import Unreachable, Upstream
from upstream.counters import read_counters
from upstream.passthrough import RelayEnd, relay

HOST_HEADER = "X-Ollama-Host"


async def admitted_relay(
    fleet: Fleet,
    ask: Ask,
    receive: Receive,
    method: str,
    path: str,
    *,
    headers: list[tuple[str, str]],
    body: bytes,
) -> Response:
    """Relay a model call once it has a slot; on another host, once, if its first host failed it before
    answering."""
    grant = await _slot(fleet, ask, receive)
    retried = False
    while True:
        host = fleet.host(grant)
        sent = time.monotonic()
        try:
            if host is None:  # removed while the request waited
                raise GatewayError(503, "the Ollama host chosen for this request was removed")
            return await relay(
                host.upstream, method, path, headers=headers, body=body, on_end=partial(_ended, fleet, grant)
            )
        except GatewayError as error:
            fleet.finish(grant, Ended(host_failed=_host_failure(error, time.monotonic() - sent)))
            if retried or not _retryable(error) or not fleet.can_retry_elsewhere(grant):
                raise
            retried = True
            grant = await _slot(fleet, replace(grant.ask, avoid=grant.ask.avoid | {grant.host}), receive)
        except BaseException:
            fleet.finish(grant, Ended())
            raise


def _ended(fleet: Fleet, grant: Grant, end: RelayEnd) -> None:
    counters = read_counters(end.tail) if end.completed else None
    failure = "the connection to Ollama was lost mid-answer" if end.upstream_failed else None
    fleet.finish(grant, Ended(counters=counters, host_failed=failure))


def _retryable(error: GatewayError) -> bool:
    """Nothing was answered: no connection, or Ollama too busy to take the request."""
    return isinstance(error, Unreachable) or error.status == 503


def _host_failure(error: GatewayError, seconds: float) -> str | None:
    """Why the host, not the request, failed: no connection, or a 5xx at once (a slow 5xx is a model that
    failed on this request)."""
    if isinstance(error, Unreachable):
        return error.message
    if error.status >= 500 and seconds < FAST_FAILURE_SECONDS:
        return f"answered {error.status} within {seconds * 1000:.0f} ms: {error.message}"
    return None


async def _slot(fleet: Fleet, ask: Ask, receive: Receive) -> Grant:
    grant = fleet.scheduler.try_acquire(ask)
    if grant is not None:
        return grant
    loop = asyncio.get_running_loop()
    admitted = loop.create_task(fleet.admit(ask))
    gone = loop.create_task(_disconnected(receive))
    try:
        await asyncio.wait((admitted, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not admitted.done():
            admitted.cancel()  # leaves the queue (a slot granted in that instant is given back)
    if admitted.cancelled():
        raise ClientDisconnect
    try:
        return admitted.result()
    except Refused as refused:
        raise GatewayError(
            refused.status, refused.message, {"Retry-After": str(refused.retry_after)}
        ) from None


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def host_holding(fleet: Fleet, model: str | None) -> Upstream:
    """A host for a call that runs nothing (a model's details, the model lists' HEAD): one that holds the
    model and has it loaded if any does, at random among equals."""
    candidates = fleet.hosts.candidates(model or "")
    if not candidates:
        raise GatewayError(503, "no Ollama host takes requests now (all disabled or draining)")
    loaded = [candidate for candidate in candidates if candidate.loaded] or candidates
    chosen = fleet.hosts.by_id[random.choice(loaded).host]  # noqa: S311 (spreading load, not a secret)
    return chosen.upstream


def named_host(fleet: Fleet, name: str | None) -> Host:
    """The host model management goes to: the one named in X-Ollama-Host (its name or id), or the only one
    that takes requests."""
    hosts = [host for host in fleet.hosts if host.config.enabled]
    if name:
        for host in hosts:
            if name.strip() in (host.name, host.id):
                return host
        known = ", ".join(host.name for host in hosts) or "none"
        raise GatewayError(400, f"{HOST_HEADER}: no enabled host is named {name.strip()!r} (hosts: {known})")
    if len(hosts) == 1:
        return hosts[0]
    known = ", ".join(host.name for host in hosts) or "none"
    raise GatewayError(400, f"several Ollama hosts: name the one to manage in {HOST_HEADER} ({known})")


async def merged_list(fleet: Fleet, path: str, field: str, name_key: str) -> dict[str, Any]:
    """A model list (`/api/tags`, `/api/ps`, `/v1/models`) from every host that takes requests, each model
    once (the first host's entry). Hosts that fail to answer are left out; if none answers, the first
    failure is the answer."""
    now = time.monotonic()
    hosts = [host for host in fleet.hosts if host.takes_work()]
    answering = [host for host in hosts if host.health.usable(now)] or hosts
    if not answering:
        raise GatewayError(503, "no Ollama host takes requests now (all disabled or draining)")
    answers = await asyncio.gather(
        *(host.upstream.fetch_json("GET", path) for host in answering), return_exceptions=True
    )
    merged: dict[str, Any] | None = None
    seen: set[Any] = set()
    failure: BaseException | None = None
    for answer in answers:
        if isinstance(answer, BaseException) or not (
            isinstance(answer, dict) and isinstance(answer.get(field), list)
        ):
            failure = failure or (
                answer
                if isinstance(answer, BaseException)
                else GatewayError(502, f"Ollama's {path} answer has no '{field}' list")
            )
            continue
        if merged is None:
            merged = {**answer, field: []}
        for entry in answer[field]:
            name = entry.get(name_key) if isinstance(entry, dict) else None
            if name is None or name not in seen:
                seen.add(name)
                merged[field].append(entry)
    if merged is None:
        assert failure is not None
        raise failure
    return merged
