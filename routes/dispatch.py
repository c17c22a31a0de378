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
import json
import random
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from functools import partial
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive

from core.errors import GatewayError
from fleet.admission import Ended, Fleet
from fleet.health import FAST_FAILURE_SECONDS
from fleet.hosts import Host
from fleet.scheduler import Ask, Grant, Refused
from upstream.client import MAX_JSON_BODY, Unreachable, Upstream, error_from
from upstream.counters import read_counters, read_final_line
from upstream.http11 import UpstreamError, UpstreamResponse
from upstream.passthrough import RelayEnd, relay, until_disconnected
from usage.records import Outcome
from usage.tally import Tally

HOST_HEADER = "X-Ollama-Host"
HOST_FAILURE_STATUSES = frozenset({502, 503, 504})
# A host that holds a model list back is left out of it after this long, rather than hold everyone's.
LIST_TIMEOUT = 5.0
EVERY_HOST = "all"
# What the usage record and the access log say of a request whose client went away before any answer
# (nginx's number for it).
CLIENT_GONE = 499


async def admitted_relay(
    fleet: Fleet,
    ask: Ask,
    receive: Receive,
    method: str,
    path: str,
    *,
    headers: list[tuple[str, str]],
    body: bytes,
    tally: Tally,
    hide_usage: bool = False,
) -> Response:
    """Relay a model call once it has a slot; on another host, once, if its first host failed it before
    answering. Its usage is recorded however it ends (`tally`): here if no answer is relayed, by the relay
    when it ends otherwise."""
    try:
        return await _admitted_relay(fleet, ask, receive, method, path, headers, body, tally, hide_usage)
    except ClientDisconnect:
        tally.finish(Outcome.CANCELLED, CLIENT_GONE)
        raise
    except GatewayError as error:
        tally.finish(_outcome_of(error), error.status)
        raise
    except BaseException:
        tally.finish(Outcome.ERROR, 503)  # cancelled: the gateway is shutting down
        raise


async def _admitted_relay(
    fleet: Fleet,
    ask: Ask,
    receive: Receive,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes,
    tally: Tally,
    hide_usage: bool,
) -> Response:
    grant = await _slot(fleet, ask, receive)
    retried = False
    while True:
        host = fleet.host(grant)
        tally.dispatched(host.name if host is not None else grant.host, grant.waited)
        sent = time.monotonic()
        try:
            if host is None:  # removed while the request waited
                raise GatewayError(503, "the Ollama host chosen for this request was removed")
            on_end = partial(_ended, fleet, grant, tally)
            return await relay(
                host.upstream, method, path, headers=headers, body=body, on_end=on_end, hide_usage=hide_usage
            )
        except GatewayError as error:
            failure = _host_failure(error, time.monotonic() - sent)
            answered = error.status < 500 and not isinstance(error, Unreachable)
            fleet.finish(grant, Ended(host_failed=failure, host_answered=answered))
            if retried or not _retryable(error) or not fleet.can_retry_elsewhere(grant):
                raise
            retried = True
            grant = await _slot(fleet, replace(grant.ask, avoid=grant.ask.avoid | {grant.host}), receive)
        except BaseException:
            fleet.finish(grant, Ended(host_answered=False))
            raise


def _ended(fleet: Fleet, grant: Grant, tally: Tally, end: RelayEnd) -> None:
    counters = None
    if end.completed:
        counters = read_final_line(end.tail) if end.line_framed else read_counters(end.tail)
    failure = "the connection to Ollama was lost mid-answer" if end.upstream_failed else None
    loaded = fleet.finish(grant, Ended(counters=counters, host_failed=failure, host_answered=failure is None))
    tally.relay_ended(end, counters, loaded)


class QueueRefused(GatewayError):
    """The fair queue refused the request: a cap (429) or its wait ran out (503)."""


def _outcome_of(error: GatewayError) -> Outcome:
    if isinstance(error, QueueRefused):
        return Outcome.REFUSED if error.status == 429 else Outcome.TIMEOUT
    if isinstance(error, Unreachable) or error.status >= 500:
        return Outcome.UPSTREAM_ERROR
    return Outcome.ERROR


def _retryable(error: GatewayError) -> bool:
    """Nothing was answered: no connection, or Ollama too busy to take the request."""
    return isinstance(error, Unreachable) or error.status == 503


def _host_failure(error: GatewayError, seconds: float) -> str | None:
    """Why the host, not the request, failed: no connection, or at once Ollama's 503 "server busy" or a
    proxy's 502/504 in front of it. Not a 500: Ollama answers one at once for a request it can't run (a
    template that does not parse), and no user may take a host out of service for everyone."""
    if isinstance(error, Unreachable):
        return error.message
    if error.status in HOST_FAILURE_STATUSES and seconds < FAST_FAILURE_SECONDS:
        return f"answered {error.status} within {seconds * 1000:.0f} ms: {error.message}"
    return None


async def _slot(fleet: Fleet, ask: Ask, receive: Receive) -> Grant:
    """A slot for the request, waiting in the fair queue if need be, while watching for the client to go."""
    grant = fleet.scheduler.try_acquire(ask)
    if grant is not None:
        return grant
    loop = asyncio.get_running_loop()
    admitted = loop.create_task(fleet.admit(ask))
    gone = loop.create_task(until_disconnected(receive))
    try:
        await asyncio.wait((admitted, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not admitted.done():
            # Leaves the queue; a slot granted in that same instant may still come out of it (below).
            admitted.cancel()
            await asyncio.wait((admitted,))
    left = gone.done() and not gone.cancelled()
    if admitted.cancelled():
        raise ClientDisconnect
    if (refused := admitted.exception()) is not None:
        if isinstance(refused, Refused):
            headers = {"Retry-After": str(refused.retry_after)}
            raise QueueRefused(refused.status, refused.message, headers) from None
        raise refused
    grant = admitted.result()
    if left:  # its turn came as the client went away: the slot goes straight back
        fleet.finish(grant, Ended(host_answered=False))
        raise ClientDisconnect
    return grant


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
        *(asyncio.wait_for(host.upstream.fetch_json("GET", path), LIST_TIMEOUT) for host in answering),
        return_exceptions=True,
    )
    merged: dict[str, Any] | None = None
    seen: set[Any] = set()
    failure: BaseException | None = None
    for answer in answers:
        if isinstance(answer, BaseException) or not (
            isinstance(answer, dict) and isinstance(answer.get(field), list)
        ):
            failure = failure or (
                GatewayError(504, f"no Ollama host answered {path} within {LIST_TIMEOUT:g} s")
                if isinstance(answer, TimeoutError)
                else answer
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


async def on_every_host(
    fleet: Fleet, method: str, path: str, *, headers: list[tuple[str, str]], body: bytes | None
) -> Response:
    """Model management on every enabled host (`X-Ollama-Host: all`), one host after the other.

    A streamed answer (pull, push, create) is one NDJSON stream: each host's progress lines, each with the
    host's name added (`"host"`), its closing `{"status": "success"}` said as `"success on <host>"`, and a
    last `{"status": "success"}` once every host succeeded. A host's failure ends the stream with an error
    line naming it; the hosts after it are not asked. A whole answer (`"stream": false`, copy, delete) is the
    last host's, once every host succeeded, or the first failure, naming its host."""
    hosts = [host for host in fleet.hosts if host.config.enabled]
    if not hosts:
        raise GatewayError(503, "no Ollama host is enabled")
    first = await _send_managed(hosts[0], method, path, headers, body)
    if b"ndjson" not in (first.header(b"content-type") or b""):
        return await _whole_answers(hosts, first, method, path, headers, body)

    async def progress() -> AsyncIterator[bytes]:
        answer: UpstreamResponse | None = first
        for host in hosts:
            try:
                answer = answer or await _send_managed(host, method, path, headers, body)
                async for line in _lines(answer, host):
                    yield line
            except GatewayError as error:
                yield _json_line({"error": f"{host.name}: {error.message}"})
                return
            finally:
                if answer is not None:
                    answer.release()
            answer = None
        yield _json_line({"status": "success"})

    return StreamingResponse(progress(), media_type="application/x-ndjson")


async def _send_managed(
    host: Host, method: str, path: str, headers: list[tuple[str, str]], body: bytes | None
) -> UpstreamResponse:
    response = await host.upstream.send(method, path, headers=headers, body=body)
    if response.status >= 400:
        try:
            error = await error_from(response, host.upstream.timeouts.idle)
        finally:
            response.close()
        raise GatewayError(error.status, f"{host.name}: {error.message}")
    return response


async def _lines(answer: UpstreamResponse, host: Host) -> AsyncIterator[bytes]:
    """The host's progress lines, each naming the host."""
    pending = b""
    while chunk := await answer.read_chunk():
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            if line.strip():
                yield _tagged(line, host)
    if pending.strip():
        yield _tagged(pending, host)


def _tagged(line: bytes, host: Host) -> bytes:
    try:
        progress = json.loads(line)
    except ValueError:
        raise GatewayError(502, f"{host.name} sent a progress line that is not JSON") from None
    if not isinstance(progress, dict):
        raise GatewayError(502, f"{host.name} sent a progress line that is not a JSON object")
    if "error" in progress:
        raise GatewayError(502, str(progress["error"]))
    if progress.get("status") == "success":
        progress["status"] = f"success on {host.name}"
    return _json_line({**progress, "host": host.name})


def _json_line(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode() + b"\n"


async def _whole_answers(
    hosts: list[Host],
    first: UpstreamResponse,
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
) -> Response:
    answer: UpstreamResponse | None = first
    status, content, content_type = 200, b"", None
    for host in hosts:
        answer = answer or await _send_managed(host, method, path, headers, body)
        try:
            content = await answer.read(MAX_JSON_BODY)
        except UpstreamError:
            raise GatewayError(502, f"{host.name}: the connection to Ollama was lost") from None
        finally:
            answer.release()
        status, content_type = answer.status, answer.header(b"content-type")
        answer = None
    media_type = content_type.decode("latin-1") if content_type else None
    return Response(content, status_code=status, media_type=media_type)
