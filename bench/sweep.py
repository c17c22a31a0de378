"""`python -m bench.sweep`: the streams scenario at rising concurrency, to see where each relay saturates.

Each step is scenario streams (bench/scenarios.py) with that many concurrent streams of 100 tokens at 20 ms:
fresh relays, a warm-up, rounds in rotated order, the median round reported. A relay keeping up stays near
the ideal 2.0 s wall time whatever the step; one that saturates (its CPU near 100% of a core) starts to
stretch the streams, first at the first byte, then between chunks. Prints a Markdown table, writes
bench/out/sweep.json and draws docs/bench-sweep.png.
"""

import argparse
import importlib.util
import shlex
import sys
import time

from bench import gateway, nginx, report
from bench.__main__ import choices
from bench.control import LoadClient, Upstream
from bench.procs import REPO_ROOT, raise_fd_limit, run_until_interrupted
from bench.scenarios import Bench, log, streams
from bench.targets import NAMES

STEPS = (50, 100, 200, 400, 600, 800)


def steps(text: str) -> list[int]:
    try:
        values = sorted({int(value) for value in text.split(",") if value.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError("a comma-separated list of stream counts") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of positive stream counts")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=steps, default=list(STEPS), help="concurrent streams at each step")
    parser.add_argument("--targets", type=choices(NAMES), default=["direct", "nginx", "gateway"])
    parser.add_argument("--rounds", type=int, default=3, help="rounds per step; the median is reported")
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "out" / "sweep.json"))
    parser.add_argument("--chart", default=str(REPO_ROOT / "docs" / "bench-sweep.png"))
    return parser.parse_args(argv)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else round(numerator / denominator, 3)


def rows(results: dict[int, dict]) -> list[dict]:
    """One row per step and target: the figures the table and the chart show."""
    table = []
    for step, by_target in results.items():
        walls = {name: figures["wall_s"] for name, figures in by_target.items()}
        for name, figures in by_target.items():
            cpu = figures["cpu"]
            table.append(
                {
                    "streams": step,
                    "target": name,
                    "wall_s": figures["wall_s"],
                    "vs_nginx": (
                        _ratio(walls[name], walls.get("nginx")) if name.startswith("gateway") else None
                    ),
                    "vs_direct": _ratio(walls[name], walls.get("direct")) if name != "direct" else None,
                    "first_byte_p50_ms": figures["first_byte_p50_ms"],
                    "first_byte_p99_ms": figures["first_byte_p99_ms"],
                    "gap_p50_ms": figures["gap_p50_ms"],
                    "gap_p99_ms": figures["gap_p99_ms"],
                    "complete": figures["ok"],
                    "incomplete": figures["count"] - figures["ok"],
                    "non_200": figures["non_200"],
                    "relay_cpu_pct": cpu["relay"]["avg_pct"] if "relay" in cpu else None,
                    "relay_cpu_peak_pct": cpu["relay"]["peak_pct"] if "relay" in cpu else None,
                    "client_cpu_pct": cpu["client"]["avg_pct"],
                    "noise_pct": round(cpu["other"]["avg_pct"] + cpu["steal"]["avg_pct"], 1),
                }
            )
    return table


def _cell(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(table: list[dict]) -> str:
    lines = [
        "| streams | target | wall s | gateway/nginx | vs direct | first byte p50 / p99 ms | "
        "gap p50 / p99 ms | incomplete | non-200 | relay CPU % (peak) | client CPU % | other+steal % |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        relay = (
            "-"
            if row["relay_cpu_pct"] is None
            else f"{row['relay_cpu_pct']:.0f} ({row['relay_cpu_peak_pct']:.0f})"
        )
        lines.append(
            f"| {row['streams']} | {row['target']} | {_cell(row['wall_s'], 2)} | "
            f"{_cell(row['vs_nginx'], 2)} | {_cell(row['vs_direct'], 2)} | "
            f"{_cell(row['first_byte_p50_ms'])} / {_cell(row['first_byte_p99_ms'])} | "
            f"{_cell(row['gap_p50_ms'])} / {_cell(row['gap_p99_ms'])} | "
            f"{row['incomplete']} | {row['non_200']} | {relay} | {row['client_cpu_pct']:.0f} | "
            f"{row['noise_pct']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench.sweep", *argv])
    if "gateway" in args.targets and not gateway.available():
        sys.exit(f"{REPO_ROOT / 'main.py'} does not exist yet: run with --targets direct,nginx")
    if importlib.util.find_spec("matplotlib") is None:
        sys.exit("matplotlib is missing: `bash bench/run.sh sweep` installs it (requirements-bench.txt)")
    from bench import charts  # matplotlib: only the charts need it

    raise_fd_limit()
    started = time.monotonic()
    results: dict[int, dict] = {}
    warnings = []
    with Upstream() as upstream, LoadClient() as client:
        for step in args.steps:
            log(f"== sweep: {step} concurrent streams")
            bench = Bench(
                upstream=upstream,
                client=client,
                targets=args.targets,
                streams=step,
                rounds=args.rounds,
                requests=0,
                held=0,
                disconnects=0,
            )
            results[step] = streams(bench)
            if warning := report.noise_warning({"streams": results[step]}):
                warnings.append(f"{step} streams: {warning}")
    table = rows(results)
    document = {
        **report.run_header(command, started, nginx.version() if "nginx" in args.targets else None),
        "settings": vars(args),
        "summary": table,
        "warnings": warnings,
        "results": {str(step): figures for step, figures in results.items()},
    }
    report.write_json(REPO_ROOT / args.out, document)
    charts.sweep_chart(document, REPO_ROOT / args.chart)
    print(markdown(table))
    for warning in warnings:
        print("\n" + warning)
    print(f"\nCommand: {command}\nResults: {args.out}\nChart: {args.chart}")
    return 0


if __name__ == "__main__":
    run_until_interrupted(main, sys.argv[1:])
