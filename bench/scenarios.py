"""The workloads, each run against every selected target with relays started fresh for it.

Fresh relays per scenario keep one scenario's leftovers (a grown heap, streams nobody cancelled) out of the
next one's figures. Each function returns {target name: figures}.
"""

import contextlib
import itertools
import json
import sys
import time
from dataclasses import dataclass

from bench.control import LoadClient, Upstream, request_json
from bench.gateway import run_gateway, signed_in_user
from bench.procs import CpuMeter, rss_bytes
from bench.replicas import Unavailable, replicas_behind_nginx, shared_stores
from bench.stats import median, summarize_ms
from bench.targets import ADMITTED_PARALLEL, Baseline, Target, open_targets

STREAM_INTERVAL = 0.02  # 50 tokens/s, a GPU-like pace
STREAM_OPTIONS = {"bench_tokens": 100, "bench_interval": STREAM_INTERVAL}
WARMUP_STREAMS = 50
WARMUP_OPTIONS = {"bench_tokens": 10, "bench_interval": STREAM_INTERVAL}
TIMEOUT = 120  # seconds any one stream may take before it counts as failed
TTFB_OPTIONS = {"bench_tokens": 1, "bench_interval": 0}  # the whole stream at once: only the relay waits
TTFB_WARMUP = 30
HELD_OPTIONS = {"bench_tokens": 1000, "bench_interval": 1.0}  # trickles: open far longer than the scenario
HELD_SETTLE = 2.0  # seconds between the last held stream's first byte and reading RSS
CUT_OPTIONS = {"bench_tokens": 40, "bench_interval": 0.05}
CUT_AFTER_LINES = 3
CUT_PAUSE = 0.1  # seconds between a hang-up and the next stream
SHORT_PATH = "/api/embed"
SHORT_BODY = json.dumps({"model": "bench", "input": "Say something."}, separators=(",", ":"))
SHORT_CONNECTIONS = 64
SHORT_WARMUP = 1.0  # seconds of load before counting: the token cache, the upstream pool
SHORT_SECONDS = 5.0
NOISY_SLOTS = 2  # the upstream's slots for the model, and the gateway's OLLAMA_PARALLEL
NOISY_OPTIONS = {"bench_tokens": 100, "bench_interval": STREAM_INTERVAL}  # one request holds a slot 2 s
NOISY_START = 0.5  # seconds between A's burst and B's first message
NOISY_PAUSE = 0.5  # seconds B takes between an answer and the next message
NOISY_ALONE = 6  # B's messages in its baseline, alone on the host
NOISY_BOUND = 120.0  # seconds B chats at most, however long A's burst takes
NOISY_TIMEOUT = 150  # seconds any one stream may take, waiting included


@dataclass
class Bench:
    upstream: Upstream
    client: LoadClient
    targets: list[str]
    streams: int
    rounds: int
    requests: int
    held: int
    disconnects: int
    baseline: Baseline | None = None
    burst: int = 30

    @property
    def admitted_slots(self) -> int:
        """OLLAMA_PARALLEL for target gateway-admitted: above whatever this run sends at once."""
        return max(ADMITTED_PARALLEL, self.streams, self.held)

    def open(
        self, names: list[str], upstreams: list[Upstream], baseline: Baseline | None = None
    ) -> contextlib.AbstractContextManager[list[Target]]:
        ports = [upstream.port for upstream in upstreams]
        return open_targets(names, ports, baseline, admitted_parallel=self.admitted_slots)

    def settle(self, upstreams: list[Upstream] | None = None) -> None:
        """Waits for the previous run's streams to end upstream, so runs do not overlap."""
        for upstream in upstreams or [self.upstream]:
            upstream.wait_idle(timeout=10)
        time.sleep(0.2)

    def warm_up(self, target: Target) -> None:
        self.client.run(concurrent_job(target, WARMUP_STREAMS, WARMUP_OPTIONS))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def concurrent_job(target: Target, count: int, options: dict) -> dict:
    return {
        "kind": "concurrent",
        "target": target.spec(),
        "count": count,
        "options": options,
        "expect_lines": options["bench_tokens"] + 1,
        "timeout": TIMEOUT,
    }


def streams(bench: Bench) -> dict:
    """A: many concurrent streams at a GPU-like pace; the relay's throughput and latency under load. With a
    baseline (an earlier gateway), it takes its turn in every round too."""
    with bench.open(bench.targets, [bench.upstream], bench.baseline) as targets:
        return _streams_rounds(bench, targets, [bench.upstream], "streams")


def two_hosts(bench: Bench) -> dict:
    """A over two upstream processes: nginx balancing them (round-robin) against the gateway with both in
    OLLAMA_URL. A direct connection has only one host, so it sits this one out."""
    names = [name for name in bench.targets if name != "direct"]
    with Upstream() as second:
        upstreams = [bench.upstream, second]
        with bench.open(names, upstreams) as targets:
            return _streams_rounds(bench, targets, upstreams, "two-hosts")


def _streams_rounds(bench: Bench, targets: list[Target], upstreams: list[Upstream], label: str) -> dict:
    runs: dict[str, list[dict]] = {target.name: [] for target in targets}
    for target in targets:
        bench.warm_up(target)
    for number in range(bench.rounds):
        # Rotate the order each round so that no target always runs first or last.
        shift = number % len(targets)
        for target in targets[shift:] + targets[:shift]:
            bench.settle(upstreams)
            for upstream in upstreams:
                upstream.reset()
            groups = {
                "client": [bench.client.process],
                "upstream": [upstream.process for upstream in upstreams],
            }
            if target.relay:
                groups["relay"] = target.relay
            with CpuMeter(groups) as cpu:
                result = bench.client.run(concurrent_job(target, bench.streams, STREAM_OPTIONS))
            result["cpu"] = cpu.summary
            # How the relay spread the streams over the hosts.
            result["served"] = [upstream.stats()["served"] for upstream in upstreams]
            runs[target.name].append(result)
            log(
                f"{label} round {number + 1}/{bench.rounds} {target.name}: wall {result['wall_s']} s, "
                f"{result['ok']}/{result['count']} ok, served {result['served']}, "
                f"cpu {_cpu_line(cpu.summary)}"
            )
    return {name: {**_combine(results), "rounds": results} for name, results in runs.items()}


def _cpu_line(summary: dict) -> str:
    return ", ".join(f"{name} {use['avg_pct']}% (peak {use['peak_pct']}%)" for name, use in summary.items())


def _combine(results: list[dict]) -> dict:
    """The median round's figures; the worst round's counts of good streams and of non-200 answers."""

    def middle(key: str, stat: str | None = None) -> float | None:
        found = [result[key] if stat is None else (result[key] or {}).get(stat) for result in results]
        values = [value for value in found if value is not None]
        return round(median(values), 4) if values else None

    return {
        "count": results[0]["count"],
        "ok": min(result["ok"] for result in results),
        "non_200": max(result["non_200"] for result in results),
        "wall_s": middle("wall_s"),
        "first_byte_p50_ms": middle("first_byte_ms", "p50"),
        "first_byte_p99_ms": middle("first_byte_ms", "p99"),
        "gap_p50_ms": middle("gap_ms", "p50"),
        "gap_p99_ms": middle("gap_ms", "p99"),
        "served": results[0]["served"],
        "cpu": {
            group: {
                "avg_pct": median([result["cpu"][group]["avg_pct"] for result in results]),
                "peak_pct": max(result["cpu"][group]["peak_pct"] for result in results),
            }
            for group in results[0]["cpu"]
        },
    }


def ttfb(bench: Bench) -> dict:
    """B: time to first byte of an idle relay, one request at a time, each on a new connection.

    With a baseline (an earlier gateway), every target runs `rounds` times, in the reverse order every other
    round, so that the two versions share the machine's drift; the round with the median p50 is reported."""
    rounds = bench.rounds if bench.baseline is not None else 1
    measured: dict[str, list[dict]] = {}
    with bench.open(bench.targets, [bench.upstream], bench.baseline) as targets:
        for turn in range(rounds):
            for target in targets if turn % 2 == 0 else targets[::-1]:
                job = {
                    "kind": "sequential",
                    "target": target.spec(),
                    "count": bench.requests,
                    "warmup": TTFB_WARMUP,
                    "options": TTFB_OPTIONS,
                    "expect_lines": TTFB_OPTIONS["bench_tokens"] + 1,
                    "timeout": TIMEOUT,
                }
                result = bench.client.run(job)
                figures = {key: result[key] for key in ("count", "ok", "problems", "first_byte_ms")}
                measured.setdefault(target.name, []).append(figures)
                log(
                    f"ttfb {target.name}, round {turn + 1}: {result['ok']}/{result['count']} ok, "
                    f"first byte {result['first_byte_ms']}"
                )
    return {name: _median_ttfb(runs) for name, runs in measured.items()}


def _median_ttfb(runs: list[dict]) -> dict:
    """The round with the median p50 first byte, with every round's p50 beside it."""
    p50s = [(run["first_byte_ms"] or {}).get("p50", float("inf")) for run in runs]
    middle = sorted(runs, key=lambda run: (run["first_byte_ms"] or {}).get("p50", float("inf")))
    return {**middle[(len(runs) - 1) // 2], "rounds_p50_ms": p50s}


def memory(bench: Bench) -> dict:
    """C: the relay's resident memory per stream held open (a direct connection has no relay to weigh)."""
    figures = {}
    relayed = [name for name in bench.targets if name != "direct"]
    with bench.open(relayed, [bench.upstream], bench.baseline) as targets:
        for target in targets:
            bench.warm_up(target)
            bench.settle()
            before = rss_bytes(target.relay)
            job = {
                "kind": "hold",
                "target": target.spec(),
                "count": bench.held,
                "options": HELD_OPTIONS,
                "timeout": TIMEOUT,
            }
            bench.client.send(json.dumps(job))
            held = bench.client.receive()
            time.sleep(HELD_SETTLE)
            during = rss_bytes(target.relay)
            upstream_streams = bench.upstream.stats()["active_streams"]
            bench.client.send("release")
            result = bench.client.receive()
            # A relay that does not cancel upstream when its client goes leaves these streams running.
            still_running = bench.upstream.wait_idle(timeout=5)
            figures[target.name] = {
                "held": held["held"],
                "count": bench.held,
                "all_held_after_s": held["after_s"],
                "upstream_streams_while_held": upstream_streams,
                "rss_before_mb": round(before / 2**20, 1),
                "rss_held_mb": round(during / 2**20, 1),
                "kb_per_stream": round((during - before) / bench.held / 1024, 1),
                "first_byte_ms": result["first_byte_ms"],
                "upstream_streams_5s_after_release": still_running,
            }
            log(f"memory {target.name}: {figures[target.name]}")
    return figures


def disconnect(bench: Bench) -> dict:
    """D: how long after a client hangs up the upstream sees its connection go (cancelling the generation).

    With a baseline (an earlier gateway), every target hangs up `disconnects` times in each of `rounds`
    rounds, in the reverse order every other round, and the figures pool every round's hang-ups: a p95
    of a few dozen is one or two of them."""
    lifetime = CUT_OPTIONS["bench_tokens"] * CUT_OPTIONS["bench_interval"]
    rounds = bench.rounds if bench.baseline is not None else 1
    cuts_of: dict[str, list[dict]] = {}
    latencies_of: dict[str, list[float]] = {}
    with bench.open(bench.targets, [bench.upstream], bench.baseline) as targets:
        for turn in range(rounds):
            for target in targets if turn % 2 == 0 else targets[::-1]:
                bench.settle()
                bench.upstream.reset()
                job = {
                    "kind": "disconnect",
                    "target": target.spec(),
                    "count": bench.disconnects,
                    "after_lines": CUT_AFTER_LINES,
                    "pause": CUT_PAUSE,
                    "label": target.name,
                    "options": CUT_OPTIONS,
                    "timeout": 10,
                }
                cuts = bench.client.run(job)["cuts"]
                # A hang-up that never reaches the upstream lets its stream run to the end: wait that long.
                bench.upstream.wait_idle(timeout=lifetime + 1)
                seen = bench.upstream.disconnects()
                closed = [cut for cut in cuts if "t_close" in cut]
                latencies = [seen[cut["id"]] - cut["t_close"] for cut in closed if cut["id"] in seen]
                cuts_of.setdefault(target.name, []).extend(cuts)
                latencies_of.setdefault(target.name, []).extend(latencies)
                log(f"disconnect {target.name}, round {turn + 1}: {summarize_ms(latencies)}")
    figures = {}
    for name, cuts in cuts_of.items():
        figures[name] = {
            "count": bench.disconnects * rounds,
            "cut": sum(1 for cut in cuts if "t_close" in cut),
            "propagated": len(latencies_of[name]),
            "stream_lifetime_s": lifetime,
            "latency_ms": summarize_ms(latencies_of[name]),
            "problems": [cut for cut in cuts if "t_close" not in cut][:5],
        }
    return figures


def _short_request(target: Target, headers: dict[str, str]) -> str:
    head = [
        f"POST {SHORT_PATH} HTTP/1.1",
        f"Host: {target.spec()['host']}:{target.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(SHORT_BODY)}",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    return "\r\n".join(head) + "\r\n\r\n" + SHORT_BODY


def _short_runs(target: Target) -> list[tuple[str, dict[str, str]]]:
    """A gateway twice, signed in with its JWT and with an API key; the references as they are."""
    if target.admin_token is None:
        return [(target.name, {})]
    key = request_json("POST", target.port, "/keys", {"name": "bench"}, target.headers)["key"]
    return [
        (f"{target.name} (JWT)", target.headers),
        (f"{target.name} (API key)", {"Authorization": f"Bearer {key}"}),
    ]


def _short_run(bench: Bench, target: Target, headers: dict[str, str]) -> dict:
    bench.settle()
    job = {
        "kind": "short",
        "target": target.spec(),
        "request": _short_request(target, headers),
        "connections": SHORT_CONNECTIONS,
        "warmup": SHORT_WARMUP,
        "seconds": SHORT_SECONDS,
        "timeout": 10,
    }
    bench.client.send(json.dumps(job))
    bench.client.receive()  # counting
    groups = {"client": [bench.client.process], "upstream": [bench.upstream.process]}
    if target.relay:
        groups["relay"] = target.relay
    with CpuMeter(groups) as cpu:
        bench.client.receive()  # counted
    result = bench.client.receive()
    del result["event"]
    relay_cpu = cpu.summary.get("relay", {}).get("cpu_s")
    return {
        **result,
        "cpu": cpu.summary,
        "relay_cpu_us_per_request": (
            round(1e6 * relay_cpu / result["answers"], 1)
            if relay_cpu is not None and result["answers"]
            else None
        ),
    }


def _median_run(runs: list[dict]) -> dict:
    """The run with the median CPU per request (requests per second when there is no relay), with every
    round's two figures beside it."""
    key = "relay_cpu_us_per_request" if runs[0]["relay_cpu_us_per_request"] is not None else "per_s"
    middle = sorted(runs, key=lambda run: run[key])[(len(runs) - 1) // 2]
    rounds = [{name: run[name] for name in ("per_s", "relay_cpu_us_per_request")} for run in runs]
    return {**middle, "rounds": rounds}


def short(bench: Bench) -> dict:
    """E: short authenticated requests (POST /api/embed, answered at once upstream) on 64 kept-alive
    connections, each sending the next as soon as its answer is in: what the relay costs per request.

    With a baseline (an earlier gateway), every run is repeated `rounds` times, in the reverse order every
    other round, so that the two versions share the machine's drift; the median is reported."""
    with bench.open(bench.targets, [bench.upstream], bench.baseline) as targets:
        runs = [(name, target, headers) for target in targets for name, headers in _short_runs(target)]
        rounds = bench.rounds if bench.baseline is not None else 1
        measured: dict[str, list[dict]] = {name: [] for name, _, _ in runs}
        for turn in range(rounds):
            for name, target, headers in runs if turn % 2 == 0 else runs[::-1]:
                measured[name].append(_short_run(bench, target, headers))
                log(f"short {name}, round {turn + 1}: {measured[name][-1]}")
    return {name: _median_run(results) for name, results in measured.items()}


def noisy(bench: Bench) -> dict:
    """F: a noisy neighbour. One host with 2 slots for the model (the fake's FIFO behind them, as Ollama's);
    person A sends `burst` requests of 2 s at once, as batch; person B chats, one message at a time. B's time
    to first byte against B's alone, A's completions, and how busy the slots were while anyone waited.
    Directly, Ollama's own FIFO decides (B waits behind all of A's); the gateway is told the slots
    (OLLAMA_PARALLEL=2) and holds the rest in its fair queue. nginx would be Ollama's FIFO again."""
    figures = {}
    names = [name for name in bench.targets if name in ("direct", "gateway")]
    request_s = NOISY_OPTIONS["bench_tokens"] * NOISY_OPTIONS["bench_interval"]
    with (
        Upstream(parallel=NOISY_SLOTS) as upstream,
        open_targets(names, [upstream.port], gateway_parallel=NOISY_SLOTS) as targets,
    ):
        for target in targets:
            a, b = _neighbours(target)

            # Each person once: the gateway's upstream connections, its cache of their tokens.
            bench.client.run(_noisy_job(a, b, NOISY_SLOTS, 1, WARMUP_OPTIONS))
            bench.settle([upstream])
            upstream.reset()
            alone = bench.client.run(_noisy_job(a, b, 0, NOISY_ALONE, NOISY_OPTIONS))
            alone_split = _first_byte_split(alone, upstream.slots()["requests"])
            bench.settle([upstream])
            upstream.reset()
            groups = {"client": [bench.client.process], "upstream": [upstream.process]}
            if target.relay:
                groups["relay"] = target.relay
            with CpuMeter(groups) as cpu:
                loaded = bench.client.run(_noisy_job(a, b, bench.burst, None, NOISY_OPTIONS, NOISY_START))
            used = upstream.slots()["requests"]
            figures[target.name] = {
                "slots": NOISY_SLOTS,
                "request_s": request_s,
                "b_alone": {
                    **{key: alone["b"][key] for key in ("count", "ok", "first_byte_ms")},
                    **alone_split,
                },
                "b": {
                    **{key: loaded["b"][key] for key in ("count", "ok", "problems", "first_byte_ms")},
                    **_first_byte_split(loaded, used),
                },
                "b_first_bytes_ms": loaded["b_first_bytes_ms"],
                "a": {
                    key: loaded["a"][key] for key in ("count", "ok", "problems", "wall_s", "first_byte_ms")
                },
                "busy": slots_busy(loaded["sent"], used, NOISY_SLOTS),
                "timeline": _timeline(loaded["sent"], used),
                "cpu": cpu.summary,
            }
            log(f"noisy {target.name}: {figures[target.name]}")
    return figures


def _noisy_job(
    a: dict, b: dict, burst: int, b_messages: int | None, options: dict, b_start: float = 0.0
) -> dict:
    """A's `burst` at once, and B's messages one at a time from `b_start` s later: `b_messages` of them,
    or (None) until A's are over."""
    return {
        "kind": "noisy",
        "a": a,
        "b": b,
        "burst": burst,
        "b_start": b_start,
        "b_pause": NOISY_PAUSE,
        "b_messages": b_messages,
        "bound": NOISY_BOUND,
        "options": options,
        "timeout": NOISY_TIMEOUT,
    }


def _neighbours(target: Target) -> tuple[dict, dict]:
    """How A (batch) and B address the target: through a gateway, as two people of their own."""
    if target.admin_token is None:
        return target.spec({"X-Priority": "batch"}), target.spec({})
    tokens = [signed_in_user(target.port, target.admin_token, email) for email in NEIGHBOURS]
    a, b = ({"Authorization": f"Bearer {token}"} for token in tokens)
    return target.spec({**a, "X-Priority": "batch"}), target.spec(b)


NEIGHBOURS = ("neighbour-a@local", "chatter-b@local")


def _first_byte_split(result: dict, used: list[dict]) -> dict:
    """Where B's time to first byte went: until the upstream gave the request its slot (waiting in the
    gateway's queue or in Ollama's FIFO, and the relay's work before it sends), and from the slot to the
    first byte at the client (the relay's way back)."""
    slot_of = {entry["id"]: entry["slot"] for entry in used}
    sent = {request["id"]: request["t"] for request in result["sent"]}
    waits, rest = [], []
    for number, first_byte_ms in enumerate(result["b_first_bytes_ms"]):
        label = f"b-{number}"
        slot = slot_of.get(label)
        if first_byte_ms is not None and slot is not None:
            waits.append(slot - sent[label])
            rest.append(sent[label] + first_byte_ms / 1000 - slot)
    return {"to_slot_ms": summarize_ms(waits), "slot_to_first_byte_ms": summarize_ms(rest)}


def _timeline(sent: list[dict], used: list[dict]) -> list[dict]:
    """Each request of the loaded run, in the order sent: when it was sent, got its slot and ended, in
    seconds from the first one sent (for a look at who waited for whom)."""
    records = {entry["id"]: entry for entry in used}
    t0 = min((request["t"] for request in sent), default=0.0)

    def since(moment: float | None) -> float | None:
        return None if moment is None else round(moment - t0, 4)

    return [
        {
            "id": request["id"],
            "sent": since(request["t"]),
            "slot": since(records.get(request["id"], {}).get("slot")),
            "end": since(records.get(request["id"], {}).get("end")),
        }
        for request in sent
    ]


def slots_busy(sent: list[dict], used: list[dict], slots: int) -> dict:
    """How busy the slots were while anyone waited for one: slot-seconds held / (slots x the time during
    which at least one request was waiting), as a fraction. A request waits from the moment the client sent
    it (`sent`: {"id", "t"}) to the moment the upstream gave it a slot (`used`: the upstream's record, with
    the time each slot was held), wherever it waited: in Ollama's FIFO or in the gateway's queue. Both
    clocks are CLOCK_MONOTONIC."""
    records = {entry["id"]: entry for entry in used}
    waits = [
        (request["t"], records[request["id"]]["slot"])
        for request in sent
        if request["id"] in records and records[request["id"]]["slot"] is not None
    ]
    held = [(entry["slot"], entry["end"]) for entry in used if entry["slot"] is not None]
    points = sorted({moment for interval in waits + held for moment in interval})
    waiting_s = held_s = 0.0
    for left, right in itertools.pairwise(points):
        middle = (left + right) / 2
        if any(start <= middle < end for start, end in waits):
            waiting_s += right - left
            held_s += (right - left) * sum(1 for start, end in held if start <= middle < end)
    return {
        "waiting_s": round(waiting_s, 3),
        "held_s": round(held_s, 3),
        "fraction": round(held_s / (slots * waiting_s), 4) if waiting_s else None,
    }


def replicas(bench: Bench) -> dict:
    """G: scenario A's streams through three gateway replicas behind nginx, sharing one Postgres database and
    one Redis (issue 14), against nginx alone; rounds rotated as in A. Skipped without Postgres and Redis."""
    try:
        with (
            shared_stores() as stores,
            bench.open(["nginx"], [bench.upstream]) as references,
            replicas_behind_nginx([bench.upstream.port], stores, REPLICAS) as three,
        ):
            return _streams_rounds(bench, [*references, three], [bench.upstream], "replicas")
    except Unavailable as missing:
        log(f"replicas: skipped, {missing}")
        return {}


def workers(bench: Bench) -> dict:
    """H: scenario E's short requests (JWT) through one gateway with one uvicorn worker and with two, both on
    REDIS_URL (several workers refuse to start without it), and with one worker and no Redis (the
    single-process path, for what Redis adds). Rounds alternate as in E. Skipped without Redis."""
    runs = [("1 worker, no Redis", 1, False), ("1 worker, Redis", 1, True), ("2 workers, Redis", 2, True)]
    try:
        with shared_stores() as stores, contextlib.ExitStack() as stack:
            targets = []
            for number, (name, count, shared) in enumerate(runs):
                settings = (
                    {
                        "REDIS_URL": stores.settings["REDIS_URL"],
                        "REDIS_PREFIX": f"{stores.settings['REDIS_PREFIX']}{number}:",
                    }
                    if shared
                    else {}
                )
                port, token, processes = stack.enter_context(
                    run_gateway([bench.upstream.port], settings, workers=count)
                )
                auth = {"Authorization": f"Bearer {token}"}
                targets.append(Target(f"gateway, {name}", port, "/chat", auth, processes, token))
            measured: dict[str, list[dict]] = {target.name: [] for target in targets}
            for turn in range(bench.rounds):
                for target in targets if turn % 2 == 0 else targets[::-1]:
                    measured[target.name].append(_short_run(bench, target, target.headers))
                    log(f"workers {target.name}, round {turn + 1}: {measured[target.name][-1]}")
    except Unavailable as missing:
        log(f"workers: skipped, {missing}")
        return {}
    return {name: _median_run(results) for name, results in measured.items()}


REPLICAS = 3

SCENARIOS = {
    "streams": streams,
    "ttfb": ttfb,
    "memory": memory,
    "disconnect": disconnect,
    "short": short,
    "two-hosts": two_hosts,
    "noisy": noisy,
    "replicas": replicas,
    "workers": workers,
}
# A plain run's: noisy takes about two minutes, so it runs when asked for (--scenarios), as do replicas and
# workers, which need Postgres and Redis.
DEFAULT_SCENARIOS = ("streams", "ttfb", "memory", "disconnect", "short", "two-hosts")
