"""Turns the scenarios' figures into the summary: ratios, targets met, a Markdown table and the JSON file."""

import datetime
import json
import os
import platform
import time
from pathlib import Path

# The gateway's targets, from the project's performance goals.
STREAMS_MAX_RATIO = 1.15  # wall time, gateway / nginx
TTFB_MAX_ADDED_MS = 1.0  # p50 first byte, gateway - direct
MEMORY_MAX_KB = 100.0  # RSS per held stream
DISCONNECT_MAX_P95_MS = 100.0  # client hang-up -> upstream connection closed
# Scenario noisy: B's p95 first byte beside A's burst at most one request's duration above B's alone (B
# waits for one of A's requests to end, never for A's queue); every one of A's completes; the slots busy
# at least this much of the time anyone waits for one (the queue is work-conserving).
NOISY_MIN_BUSY = 0.90
# Above this, other work or the hypervisor took CPU from the bench (% of one core, average over a run).
NOISE_MAX_PCT = 25.0


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def _met(condition: bool | None) -> str:
    return "n/a" if condition is None else ("yes" if condition else "no")


def _row(scenario: str, target: str, figures: str, ratio: str = "", met: str = "") -> dict:
    return {
        "scenario": scenario,
        "target": target,
        "figures": figures,
        "ratio": ratio or "-",
        "met": met or "-",
    }


def _is_gateway(name: str) -> bool:
    return name.startswith("gateway")


def _streams_rows(results: dict, scenario: str = "streams") -> list[dict]:
    rows = []
    walls = {name: figures["wall_s"] for name, figures in results.items()}
    for name, figures in results.items():
        text = (
            f"wall {_num(figures['wall_s'], 2)} s, {figures['ok']}/{figures['count']} complete, "
            f"first byte p50 {_num(figures['first_byte_p50_ms'])} / "
            f"p99 {_num(figures['first_byte_p99_ms'])} ms, "
            f"gap p99 {_num(figures['gap_p99_ms'])} ms"
        )
        served = figures.get("served") or []
        if len(served) > 1:
            text += f", streams per host {' / '.join(str(count) for count in served)}"
        ratio, met = "", ""
        if name == "nginx" and "direct" in walls:
            ratio = f"nginx/direct {_num(_ratio(walls['nginx'], walls['direct']), 2)}"
        if _is_gateway(name):
            vs_nginx = _ratio(walls[name], walls.get("nginx"))
            parts = [
                f"{name}/{other} {_num(_ratio(walls[name], walls[other]), 2)}"
                for other in ("nginx", "direct")
                if other in walls
            ]
            if (earlier := _baseline_of(results, name)) is not None:
                parts.append(f"**now/before {_num(_ratio(walls[name], earlier['wall_s']), 2)}**")
            ratio = ", ".join(parts)
            complete = figures["ok"] == figures["count"]
            met = _met(None if vs_nginx is None else vs_nginx <= STREAMS_MAX_RATIO and complete)
        rows.append(_row(scenario, name, text, ratio, met))
    return rows


def _two_hosts_rows(results: dict) -> list[dict]:
    return _streams_rows(results, "two-hosts")


def _ttfb_rows(results: dict) -> list[dict]:
    rows = []
    direct = (results.get("direct") or {}).get("first_byte_ms")
    for name, figures in results.items():
        first_byte = figures["first_byte_ms"] or {}
        text = (
            f"first byte p50 {_num(first_byte.get('p50'), 2)} / p99 {_num(first_byte.get('p99'), 2)} ms, "
            f"{figures['ok']}/{figures['count']} complete"
        )
        ratio, met = "", ""
        added = None
        if name != "direct" and direct and first_byte:
            added = first_byte["p50"] - direct["p50"]
            ratio = f"p50 {added:+.2f} ms vs direct"
            earlier = (_baseline_of(results, name) or {}).get("first_byte_ms")
            if earlier:
                ratio += f", **{first_byte['p50'] - earlier['p50']:+.2f} ms vs before**"
        if len(figures.get("rounds_p50_ms", [])) > 1:
            text += f" (median of {len(figures['rounds_p50_ms'])} rounds)"
        if _is_gateway(name):
            met = _met(
                None if added is None else added <= TTFB_MAX_ADDED_MS and figures["ok"] == figures["count"]
            )
        rows.append(_row("ttfb", name, text, ratio, met))
    return rows


def _memory_rows(results: dict) -> list[dict]:
    rows = []
    for name, figures in results.items():
        text = (
            f"RSS {figures['rss_before_mb']} -> {figures['rss_held_mb']} MB "
            f"with {figures['held']}/{figures['count']} streams held: {figures['kb_per_stream']} KB/stream"
        )
        ratio, met = "", ""
        if _is_gateway(name):
            if "nginx" in results:
                per_stream = _ratio(figures["kb_per_stream"], results["nginx"]["kb_per_stream"])
                ratio = f"{name}/nginx {_num(per_stream)}"
            if (earlier := _baseline_of(results, name)) is not None:
                before = figures["kb_per_stream"] - earlier["kb_per_stream"]
                ratio += f", **{before:+.1f} KB/stream vs before**"
            met = _met(figures["kb_per_stream"] <= MEMORY_MAX_KB and figures["held"] == figures["count"])
        rows.append(_row("memory", name, text, ratio, met))
    return rows


def _disconnect_rows(results: dict) -> list[dict]:
    rows = []
    for name, figures in results.items():
        latency = figures["latency_ms"] or {}
        text = (
            f"{figures['propagated']}/{figures['cut']} hang-ups reached upstream within the stream's "
            f"{figures['stream_lifetime_s']:g} s; p50 {_num(latency.get('p50'), 2)} / "
            f"p95 {_num(latency.get('p95'), 2)} / max {_num(latency.get('max'), 2)} ms"
        )
        met, ratio = "", ""
        earlier = (_baseline_of(results, name) or {}).get("latency_ms")
        if earlier and latency:
            ratio = f"**p95 {latency['p95'] - earlier['p95']:+.2f} ms vs before**"
        if _is_gateway(name):
            all_seen = figures["propagated"] == figures["cut"] == figures["count"]
            met = _met(bool(latency) and all_seen and latency["p95"] <= DISCONNECT_MAX_P95_MS)
        rows.append(_row("disconnect", name, text, ratio, met))
    return rows


def _requests_text(figures: dict) -> str:
    """A short-requests run's rate, answers and latency (scenarios short and workers)."""
    latency = figures["latency_ms"] or {}
    return (
        f"{figures['per_s']:.0f} req/s, {figures['ok']}/{figures['answers']} 200, latency "
        f"p50 {_num(latency.get('p50'), 2)} / p99 {_num(latency.get('p99'), 2)} ms"
    )


def _short_rows(results: dict) -> list[dict]:
    """No target within the run: the gateway's figure is compared with an earlier version's, measured in
    the same run when there is one (`--baseline`)."""
    rows = []
    nginx = (results.get("nginx") or {}).get("relay_cpu_us_per_request")
    for name, figures in results.items():
        cpu = figures["relay_cpu_us_per_request"]
        text = _requests_text(figures)
        if cpu is not None:
            text += f", relay CPU {cpu:.0f} µs/request"
        if len(figures.get("rounds", [])) > 1:
            text += f" (median of {len(figures['rounds'])} rounds)"
        ratios = []
        if name.startswith("gateway") and cpu is not None and nginx:
            ratios.append(f"CPU/request gateway/nginx {_num(_ratio(cpu, nginx))}")
        if (earlier := _earlier_version(results, name)) is not None:
            ratios.append(
                f"**now/before: req/s {_num(_ratio(figures['per_s'], earlier['per_s']), 2)}, CPU/request "
                f"{_num(_ratio(cpu, earlier['relay_cpu_us_per_request']), 2)}**"
            )
        rows.append(_row("short", name, text, "; ".join(ratios)))
    return rows


def _baseline_of(results: dict, name: str) -> dict | None:
    """For target "gateway", the figures of "gateway <commit>", the earlier version run beside it
    (`--baseline`), if there is one."""
    if name != "gateway":
        return None
    return next((figures for other, figures in results.items() if other.startswith("gateway ")), None)


def _earlier_version(results: dict, name: str) -> dict | None:
    """For "gateway (JWT)", the figures of "gateway <commit> (JWT)", the baseline's same run, if measured."""
    if not name.startswith("gateway ("):
        return None
    credential = name.removeprefix("gateway ")
    for other, figures in results.items():
        if other != name and other.startswith("gateway ") and other.endswith(" " + credential):
            return figures
    return None


def _p95(summary: dict | None) -> float | None:
    return None if summary is None else summary["p95"]


def _noisy_rows(results: dict) -> list[dict]:
    rows = []
    for name, figures in results.items():
        alone = figures["b_alone"]["first_byte_ms"] or {}
        loaded = figures["b"]["first_byte_ms"] or {}
        a, b, busy = figures["a"], figures["b"], figures["busy"]
        fraction = busy["fraction"]
        text = (
            f"B first byte p50 / p95: alone {_num(alone.get('p50'))} / {_num(alone.get('p95'))} ms, "
            f"beside A's burst {_num(loaded.get('p50'))} / {_num(loaded.get('p95'))} ms "
            f"({b['ok']}/{b['count']} complete; p95 until its slot {_num(_p95(b['to_slot_ms']))} ms, "
            f"slot to first byte {_num(_p95(b['slot_to_first_byte_ms']))} ms); "
            f"A {a['ok']}/{a['count']} complete, the last after {_num(a['wall_s'])} s; "
            f"slots busy {_num(None if fraction is None else 100 * fraction)}% "
            f"while anyone waited ({_num(busy['waiting_s'])} s)"
        )
        added = loaded["p95"] - alone["p95"] if loaded and alone else None
        ratio = "" if added is None else f"B p95 {added / 1000:+.2f} s vs alone"
        met = ""
        if _is_gateway(name):
            met = _met(
                None
                if added is None or fraction is None
                else added <= 1000 * figures["request_s"]
                and a["ok"] == a["count"]
                and b["ok"] == b["count"]
                and fraction >= NOISY_MIN_BUSY
            )
        rows.append(_row("noisy", name, text, ratio, met))
    return rows


def _replicas_rows(results: dict) -> list[dict]:
    """Replicas behind nginx against nginx alone: what a second hop and the shared queue cost a stream. No
    target: the issue asks for the figure."""
    rows = []
    nginx_wall = (results.get("nginx") or {}).get("wall_s")
    for name, figures in results.items():
        text = (
            f"wall {_num(figures['wall_s'], 2)} s, {figures['ok']}/{figures['count']} complete, "
            f"first byte p50 {_num(figures['first_byte_p50_ms'])} / "
            f"p99 {_num(figures['first_byte_p99_ms'])} ms, gap p99 {_num(figures['gap_p99_ms'])} ms"
        )
        ratio = "" if name == "nginx" else f"**/nginx {_num(_ratio(figures['wall_s'], nginx_wall), 2)}**"
        rows.append(_row("replicas", name, text, ratio))
    return rows


def _workers_rows(results: dict) -> list[dict]:
    """Short requests with one uvicorn worker and with two: the second worker's gain, and what Redis costs."""
    rows = []
    one = next((figures for name, figures in results.items() if name.endswith("1 worker, Redis")), None)
    for name, figures in results.items():
        cpu = figures["relay_cpu_us_per_request"]
        text = (
            _requests_text(figures)
            + ("" if cpu is None else f", CPU {cpu:.0f} µs/request")
            + f" (median of {len(figures.get('rounds', []))} rounds)"
        )
        ratio = ""
        if one is not None and figures is not one:
            ratio = (
                f"against 1 worker with Redis: req/s {_num(_ratio(figures['per_s'], one['per_s']), 2)}, "
                f"CPU/request {_num(_ratio(cpu, one['relay_cpu_us_per_request']), 2)}"
            )
        rows.append(_row("workers", name, text, ratio))
    return rows


ROWS = {
    "streams": _streams_rows,
    "ttfb": _ttfb_rows,
    "memory": _memory_rows,
    "disconnect": _disconnect_rows,
    "short": _short_rows,
    "two-hosts": _two_hosts_rows,
    "noisy": _noisy_rows,
    "replicas": _replicas_rows,
    "workers": _workers_rows,
}


def summary_rows(results: dict) -> list[dict]:
    return [row for scenario, figures in results.items() for row in ROWS[scenario](figures)]


def markdown(rows: list[dict]) -> str:
    lines = ["| scenario | target | figures | ratio | target met |", "|---|---|---|---|---|"]
    lines += [
        f"| {r['scenario']} | {r['target']} | {r['figures']} | {r['ratio']} | {r['met']} |" for r in rows
    ]
    return "\n".join(lines)


def cpu_markdown(streams: dict, scenario: str = "streams") -> str:
    """CPU use during scenario A (or two-hosts): whichever process nears 100% of a core limits that run."""
    lines = [
        f"CPU in scenario {scenario}, % of one core: median of rounds (busiest 0.25 s). other: the rest of "
        "the machine; steal: taken by the hypervisor.",
        "",
        "| target | client | upstream | relay | other | steal |",
        "|---|---|---|---|---|---|",
    ]
    for name, figures in streams.items():
        cells = []
        for group in ("client", "upstream", "relay", "other", "steal"):
            use = figures["cpu"].get(group)
            cells.append(f"{use['avg_pct']:.0f}% ({use['peak_pct']:.0f}%)" if use else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def noise_warning(results: dict) -> str | None:
    """A warning when something else kept the machine busy during the scenarios that measure CPU (streams,
    two-hosts, noisy), skewing every figure."""
    measured: dict[str, float] = {}
    for scenario in ("streams", "two-hosts", "noisy"):
        for figures in (results.get(scenario) or {}).values():
            for run in figures.get("rounds", [figures]):
                noise = run["cpu"]["other"]["avg_pct"] + run["cpu"]["steal"]["avg_pct"]
                measured[scenario] = max(measured.get(scenario, 0.0), noise)
    if not measured or max(measured.values()) <= NOISE_MAX_PCT:
        return None
    worst = ", ".join(
        f"{noise:.0f}% of a core in scenario {scenario}" for scenario, noise in measured.items()
    )
    return (
        f"Warning: other processes or the hypervisor took up to {worst}; rerun on a quiet machine before "
        "trusting these figures."
    )


def write_json(path: Path, document: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")


def run_header(command: str, started: float, nginx_version: str | None = None) -> dict:
    """What every results file opens with: how the run was started, when, how long it took, on what."""
    machine = {"cpus": os.cpu_count(), "python": platform.python_version()}
    if nginx_version is not None:
        machine["nginx"] = nginx_version
    return {
        "command": command,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "duration_s": round(time.monotonic() - started, 1),
        "machine": machine,
    }
