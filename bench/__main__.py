"""`python -m bench`: runs the scenarios against the targets in one go, prints and saves the summary.

Three processes share the machine during a measurement: the load client, the relay under test and the fake
upstream, each its own process, so the figures compare relays, not whoever ran in the relay's process.
"""

import argparse
import contextlib
import shlex
import sys
import time

from bench import baseline, gateway, nginx, report
from bench.control import LoadClient, Upstream
from bench.procs import REPO_ROOT, raise_fd_limit, run_until_interrupted
from bench.scenarios import DEFAULT_SCENARIOS, SCENARIOS, Bench, log
from bench.targets import NAMES, Baseline


def choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        chosen = [name.strip() for name in text.split(",") if name.strip()]
        unknown = sorted(set(chosen) - set(allowed))
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(f"choose among {', '.join(allowed)}")
        # The canonical order, whatever order was asked: direct and nginx are the references.
        return [name for name in allowed if name in chosen]

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios",
        type=choices(tuple(SCENARIOS)),
        default=list(DEFAULT_SCENARIOS),
        help=f"default: {','.join(DEFAULT_SCENARIOS)}",
    )
    parser.add_argument("--targets", type=choices(NAMES), default=list(NAMES))
    parser.add_argument("--streams", type=int, default=400, help="concurrent streams in scenario streams")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of scenario streams; the median is reported"
    )
    parser.add_argument("--requests", type=int, default=300, help="sequential requests in scenario ttfb")
    parser.add_argument("--held", type=int, default=1000, help="streams held open in scenario memory")
    parser.add_argument("--disconnects", type=int, default=50, help="hang-ups in scenario disconnect")
    parser.add_argument("--burst", type=int, default=30, help="A's requests at once in scenario noisy")
    parser.add_argument(
        "--upstream-parallel",
        type=int,
        metavar="N",
        help="the shared fake upstream schedules like Ollama, N slots per model and a FIFO behind them "
        "(default: no limit; scenario noisy runs its own with 2 slots, two-hosts its second without limit)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REVISION",
        help="scenario short also runs the gateway as it was at this commit, alternating rounds with today's",
    )
    parser.add_argument("--out", default=str(REPO_ROOT / "bench" / "out" / "results.json"))
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    command = shlex.join([".venv/bin/python", "-m", "bench", *argv])
    if "gateway" in args.targets and not gateway.available():
        sys.exit(f"{REPO_ROOT / 'main.py'} does not exist yet: run with --targets direct,nginx")
    raise_fd_limit()
    started = time.monotonic()
    results = {}
    with contextlib.ExitStack() as stack:
        earlier = None
        if args.baseline and "gateway" in args.targets:
            name = baseline.short_name(args.baseline)
            earlier = Baseline(name, stack.enter_context(baseline.unpacked(name)))
        upstream = stack.enter_context(Upstream(args.upstream_parallel))
        client = stack.enter_context(LoadClient())
        bench = Bench(
            upstream=upstream,
            client=client,
            targets=args.targets,
            streams=args.streams,
            rounds=args.rounds,
            requests=args.requests,
            held=args.held,
            disconnects=args.disconnects,
            baseline=earlier,
            burst=args.burst,
        )
        for name in args.scenarios:
            log(f"== {name}")
            results[name] = SCENARIOS[name](bench)
    rows = report.summary_rows(results)
    report.write_json(
        REPO_ROOT / args.out,
        {
            **report.run_header(command, started, nginx.version() if "nginx" in args.targets else None),
            "settings": vars(args),
            "summary": rows,
            "results": results,
        },
    )
    print(report.markdown(rows))
    for name in ("streams", "two-hosts", "replicas"):
        if results.get(name):
            print("\n" + report.cpu_markdown(results[name], name))
    if warning := report.noise_warning(results):
        print("\n" + warning)
    print(f"\nCommand: {command}\nResults: {args.out}")
    return 0


if __name__ == "__main__":
    run_until_interrupted(main, sys.argv[1:])
