"""`python -m bench.soak`: the gateway under mixed traffic for minutes; do its memory and fds stay flat?

One gateway (one uvicorn worker, as deployed) in front of the fake upstream, and bench/traffic.py's pool of
workers logging in, listing models, streaming chats (some hung up mid-stream), uploading and downloading.
Every couple of seconds the gateway's RSS, file descriptors and sockets are sampled. After a warm-up (the
heap, the upstream pool and the caches fill), a steady load should hold them steady: what still climbs at
the end is a leak. Prints a summary, writes it to bench/out/soak.json and draws docs/bench-soak.png.
"""

import argparse
import importlib.util
import secrets
import shlex
import statistics
import sys
import time
from pathlib import Path

from bench import gateway
from bench.control import LoadClient, Upstream, request_json
from bench.procs import REPO_ROOT, CpuMeter, raise_fd_limit, run_until_interrupted
from bench.report import run_header, write_json
from bench.sampler import ResourceSampler, regular_files, sockets
from bench.scenarios import STREAM_OPTIONS, log
from bench.stats import percentile

# Every worker signs in from 127.0.0.1, a few times a minute each: the sign-in limits (per address, and
# checks at once per address) are for strangers, and must not turn the soak's logins into 429s.
GATEWAY_SETTINGS = {
    "LOGIN_MAX_FAILURES": "1000000",
    "LOGIN_MAX_FAILURES_PER_ADDRESS": "1000000",
    "LOGIN_MAX_FAILURES_PER_EMAIL": "2000000",
    "LOGIN_MAX_ATTEMPTS_PER_ADDRESS": "1000000",
    "LOGIN_MAX_CONCURRENT_PER_ADDRESS": "1000",
}
SOAK_EMAIL = "soak@local"
# Relative weights of the kinds of request each worker picks from (see bench/traffic.py).
WEIGHTS = {
    "login": 3,
    "models": 8,
    "tags": 8,
    "chat": 35,
    "chat_cut": 10,
    "upload": 12,
    "download": 20,
}
CUT_AFTER_LINES = (2, 60)  # a hung-up stream is cut after this many lines, at random
THINK_MS = (0, 200)  # pause between a worker's requests, at random
KEEP_FILES = 40  # uploads kept for downloads; older ones are deleted
REQUEST_TIMEOUT = 60  # seconds any one request may take before it counts as failed
# "start" and "end" are the floor of a window this long: its lower quartile. Each login's Argon2 hash briefly
# adds 64 MiB of RSS, and a burst of logins can spike half a window's samples; the verdict is about the
# floor rising, which a leak raises and a spike does not.
WINDOW_S = 30.0
FLOOR = 0.25
RSS_TOLERANCE = 0.10  # end RSS within 10% of start
FDS_TOLERANCE = 20  # end fds within 20 of start
IDLE_SETTLE_S = 3.0  # after the load, before the idle reading


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load, warm-up included")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before the 'start' reading")
    parser.add_argument("--workers", type=int, default=32, help="concurrent clients")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--upload-kb", type=int, default=100, help="size of each upload")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "out" / "soak.json"))
    parser.add_argument("--chart", default=str(REPO_ROOT / "docs" / "bench-soak.png"))
    args = parser.parse_args(argv)
    if args.minutes * 60 < args.warmup + 2 * WINDOW_S:
        parser.error(f"--minutes must leave room for the warm-up and two {WINDOW_S:g} s windows")
    return args


def soak_user(port: int, admin_token: str) -> tuple[str, str]:
    """Adds an ordinary user for the traffic (the bench's admin stays out of it): (email, password)."""
    password = secrets.token_urlsafe(24)
    user = {"email": SOAK_EMAIL, "password": password, "role": "user", "models": None}
    request_json("POST", port, "/admin/users", user, {"Authorization": f"Bearer {admin_token}"})
    return SOAK_EMAIL, password


def floor(samples: list[dict], key: str) -> float | None:
    values = [sample[key] for sample in samples if sample.get(key) is not None]
    return round(percentile(values, FLOOR), 2) if values else None


def slope_per_minute(samples: list[dict], key: str) -> float | None:
    """Least-squares trend of a figure, per minute: a leak is a slope that does not go away.

    Fitted to the floors of successive windows rather than to every sample, so that the login spikes
    do not tilt it.
    """
    windows: dict[int, list[dict]] = {}
    for sample in samples:
        windows.setdefault(int(sample["t_s"] // WINDOW_S), []).append(sample)
    floors = [
        (statistics.fmean(sample["t_s"] for sample in group) / 60, floor(group, key))
        for group in windows.values()
    ]
    # A window in which the figure was never read has no floor to fit.
    points = [(t, value) for t, value in floors if value is not None]
    if len(points) < 2:
        return None
    mean_t = statistics.fmean(t for t, _ in points)
    mean_v = statistics.fmean(v for _, v in points)
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return round(sum((t - mean_t) * (v - mean_v) for t, v in points) / spread, 3) if spread else None


def analyse(samples: list[dict], warmup: float, duration: float) -> dict:
    """Start, peak and end of each figure under load after the warm-up, their trend, and whether RSS and fds
    are flat. Samples after `duration` (the last requests draining) are not steady load: left out."""
    steady = [sample for sample in samples if warmup <= sample["t_s"] <= duration]
    first = [sample for sample in steady if sample["t_s"] < warmup + WINDOW_S]
    last = [sample for sample in steady if sample["t_s"] >= steady[-1]["t_s"] - WINDOW_S]
    figures = {}
    for key in ("rss_mb", "fds", "tcp", "close_wait", "files", "threads", "upstream_connections"):
        figures[key] = {
            "start": floor(first, key),
            "peak": max(sample[key] for sample in steady),
            "end": floor(last, key),
            "per_minute": slope_per_minute(steady, key),
        }
    rss, fds = figures["rss_mb"], figures["fds"]
    verdict = {
        "rss_flat": rss["end"] <= rss["start"] * (1 + RSS_TOLERANCE),
        "fds_flat": fds["end"] <= fds["start"] + FDS_TOLERANCE,
        "rule": f"end (floor of the last {WINDOW_S:g} s) <= start (floor of the {WINDOW_S:g} s after the "
        f"warm-up) + {RSS_TOLERANCE:.0%} RSS / + {FDS_TOLERANCE} fds; floor: lower quartile of the samples",
    }
    return {"figures": figures, "verdict": verdict}


def log_errors(path: Path) -> list[str]:
    """The gateway log's error lines and tracebacks: a soak can pass its checks and still be logging these."""
    lines = path.read_text(errors="replace").splitlines()
    return [line for line in lines if "Traceback" in line or "ERROR" in line or "Exception" in line]


def markdown(analysis: dict, before: dict, after: dict, traffic: dict, cpu: dict) -> str:
    names = {
        "rss_mb": "RSS (MB)",
        "fds": "open fds",
        "tcp": "TCP sockets",
        "close_wait": "sockets in CLOSE_WAIT",
        "files": "regular files open",
        "threads": "threads",
        "upstream_connections": "upstream connections (pool)",
    }
    lines = [
        "| gateway | before load | start | peak | end | trend per min | after load, idle |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, name in names.items():
        f = analysis["figures"][key]
        lines.append(
            f"| {name} | {before.get(key)} | {f['start']} | {f['peak']} | {f['end']} | "
            f"{f['per_minute']:+} | {after.get(key)} |"
        )
    verdict = analysis["verdict"]
    lines += [
        "",
        f"RSS flat: {'yes' if verdict['rss_flat'] else 'NO'}; fds flat: "
        f"{'yes' if verdict['fds_flat'] else 'NO'} ({verdict['rule']}).",
        "",
        "| request | count | ok | errors | p50 / p99 ms |",
        "|---|---|---|---|---|",
    ]
    for kind, tally in traffic["kinds"].items():
        ms = tally["ms"] or {}
        errors = ", ".join(f"{problem}: {n}" for problem, n in tally["errors"].items()) or "0"
        latency = f"{ms.get('p50', '-')} / {ms.get('p99', '-')}"
        lines.append(f"| {kind} | {tally['count']} | {tally['ok']} | {errors} | {latency} |")
    lines += [
        "",
        "CPU over the whole load, % of one core: "
        + ", ".join(f"{name} {use['avg_pct']:.0f}%" for name, use in cpu.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench.soak", *argv])
    if not gateway.available():
        sys.exit(f"{REPO_ROOT / 'main.py'} does not exist yet: there is no gateway to soak")
    if importlib.util.find_spec("matplotlib") is None:
        sys.exit("matplotlib is missing: `bash bench/run.sh soak` installs it (requirements-bench.txt)")
    from bench import charts  # matplotlib: only the charts need it

    raise_fd_limit()
    out = REPO_ROOT / args.out
    gateway_log = out.with_name("soak-gateway.log")
    duration = args.minutes * 60
    with (
        Upstream() as upstream,
        gateway.run_gateway([upstream.port], GATEWAY_SETTINGS, gateway_log) as (port, admin, processes),
        LoadClient("bench.traffic") as client,
    ):
        email, password = soak_user(port, admin)
        token = request_json("POST", port, "/login", {"email": email, "password": password})["access_token"]

        def upstream_figures() -> dict:
            stats = upstream.stats()
            return {
                "upstream_connections": stats["open_connections"],
                "upstream_streams": stats["active_streams"],
            }

        def progress(sample: dict) -> None:
            # A line a minute, so a long soak shows it is alive and where it is heading.
            if int(sample["t_s"]) % 60 < args.interval:
                log(
                    f"soak {sample['t_s'] / 60:.1f} min: RSS {sample['rss_mb']} MB, {sample['fds']} fds, "
                    f"{sample['upstream_connections']} upstream connections, cpu {sample.get('cpu')}"
                )

        groups = {"gateway": processes, "client": [client.process], "upstream": [upstream.process]}
        sampler = ResourceSampler(processes, args.interval, groups, upstream_figures, progress)
        before = sampler.take()
        job = {
            "kind": "mixed",
            "host": "127.0.0.1",
            "port": port,
            "email": email,
            "password": password,
            "token": token,
            "workers": args.workers,
            "duration_s": duration,
            "weights": WEIGHTS,
            "chat_options": STREAM_OPTIONS,
            "cut_after_lines": CUT_AFTER_LINES,
            "think_ms": THINK_MS,
            "upload_kb": args.upload_kb,
            "keep_files": KEEP_FILES,
            "timeout": REQUEST_TIMEOUT,
        }
        log(f"soak: {args.workers} workers for {args.minutes:g} min against the gateway on port {port}")
        started = time.monotonic()
        with CpuMeter(groups) as cpu, sampler:
            traffic = client.run(job)
        still_streaming = upstream.wait_idle(timeout=10)
        time.sleep(IDLE_SETTLE_S)
        after = {**sampler.take(), "upstream_streams": still_streaming}
        # What the gateway still holds once idle, for whoever has to explain a leak.
        held = {"sockets": dict(sockets(processes)), "files": regular_files(processes)}
    analysis = analyse(sampler.samples, args.warmup, duration)
    errors_logged = log_errors(gateway_log)
    document = {
        **run_header(command, started),
        "settings": {**vars(args), "weights": WEIGHTS, "gateway": GATEWAY_SETTINGS},
        "before": before,
        "after": after,
        "held_after": held,
        **analysis,
        "cpu": cpu.summary,
        "traffic": traffic,
        "gateway_log_errors": {"count": len(errors_logged), "first": errors_logged[:20]},
        "samples": sampler.samples,
    }
    write_json(out, document)
    chart = REPO_ROOT / args.chart
    charts.soak_chart(document, chart)
    print(markdown(analysis, before, after, traffic, cpu.summary))
    print(f"\nGateway log: {len(errors_logged)} error lines ({gateway_log})")
    print(f"\nCommand: {command}\nResults: {args.out}\nChart: {args.chart}")
    return 0


if __name__ == "__main__":
    run_until_interrupted(main, sys.argv[1:])
