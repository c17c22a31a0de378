"""PNG charts of the sweep and the soak, for docs/. matplotlib is a bench-only dependency
(requirements-bench.txt): nothing but the sweep and the soak imports this module."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server, and no GUI toolkit to import

import matplotlib.pyplot as plt
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

from bench.report import NOISE_MAX_PCT
from bench.stats import percentile

COLORS = {"direct": "tab:gray", "nginx": "tab:green", "gateway": "tab:blue"}


def _save(figure: plt.Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def sweep_chart(document: dict, path: Path) -> None:
    """Wall time relative to direct, first-byte p99 and gap p99 against concurrency, a line per target."""
    table = document["summary"]
    targets = [name for name in COLORS if any(row["target"] == name for row in table)]
    figure, (walls, first, gaps) = plt.subplots(1, 3, figsize=(15, 4.6))
    for name in targets:
        rows = [row for row in table if row["target"] == name]
        x = [row["streams"] for row in rows]
        style = {"color": COLORS[name], "marker": "o", "label": name}
        walls.plot(x, [1.0 if name == "direct" else row["vs_direct"] for row in rows], **style)
        first.plot(x, [row["first_byte_p99_ms"] for row in rows], **style)
        gaps.plot(x, [row["gap_p99_ms"] for row in rows], **style)
        if name == "gateway":
            for row in rows:
                if row["vs_nginx"] is not None:
                    walls.annotate(
                        f"{row['vs_nginx']:.2f}x nginx",
                        (row["streams"], row["vs_direct"]),
                        textcoords="offset points",
                        xytext=(0, 8),
                        ha="center",
                        fontsize=8,
                        color=COLORS[name],
                    )
    walls.set(title="wall time ÷ direct's (1.0 = no cost)", ylabel="ratio")
    # Room above the highest point for its label; 1.0 always in view, so small costs look small.
    ratios = [row["vs_direct"] for row in table if row["vs_direct"] is not None] + [1.0]
    lowest, highest = min(0.98, min(ratios) - 0.02), max(ratios)
    walls.set_ylim(lowest, max(1.1, highest + 0.1 * (highest - lowest) + 0.02))
    first.set(title="first byte p99", ylabel="ms", yscale="log")
    # Plain numbers at 1, 2, 5, 10, 20, 50... ms, rather than powers of ten.
    first.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
    first.yaxis.set_major_formatter(ScalarFormatter())
    first.yaxis.set_minor_formatter(NullFormatter())
    gaps.set(title="gap between chunks p99 (pace: 20 ms)", ylabel="ms")
    steps = sorted({row["streams"] for row in table})
    for axes in (walls, first, gaps):
        axes.set_xlabel("concurrent streams (100 tokens at 20 ms)")
        # Steps mostly double: a log scale spaces them evenly.
        axes.set_xscale("log", base=2)
        axes.set_xticks(steps)
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.grid(True, alpha=0.3)
        axes.legend()
    rounds = document["settings"]["rounds"]
    title = (
        f"Saturation sweep, {document['date'][:10]}, {document['machine']['cpus']} CPUs, "
        f"median of {rounds} round{'s' if rounds > 1 else ''} per point"
    )
    noise = max(row["noise_pct"] for row in table)
    if noise > NOISE_MAX_PCT:
        title += f"; other processes took up to {noise:.0f}% of a core"
    figure.suptitle(title)
    figure.tight_layout()
    _save(figure, path)


def rolling_floor(times: list[float], values: list[float], span: float) -> list[float]:
    """Each value replaced by the lower quartile of the values within `span` before it: the floor under the
    spikes, as the soak's verdict reads it."""
    smoothed, start = [], 0
    for index, now in enumerate(times):
        while times[start] < now - span:
            start += 1
        smoothed.append(percentile(values[start : index + 1], 0.25))
    return smoothed


def soak_chart(document: dict, path: Path) -> None:
    """The gateway's RSS, and its fds, files, threads and upstream connections over the soak."""
    samples = document["samples"]
    warmup = document["settings"]["warmup"] / 60
    seconds = [sample["t_s"] for sample in samples]
    minutes = [t / 60 for t in seconds]
    rss = [sample["rss_mb"] for sample in samples]
    floor = rolling_floor(seconds, rss, 30.0)
    figure, (memory, descriptors) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    memory.plot(minutes, rss, color="tab:blue", alpha=0.3, linewidth=0.8, label="RSS, every sample")
    memory.plot(minutes, floor, color="tab:blue", linewidth=2, label="RSS floor (lower quartile of 30 s)")
    # Logins' Argon2 spikes (64 MiB each) would flatten the floor into a line: cut them off, say so.
    memory.set_ylim(0, max(floor) * 1.6)
    for key, color, label in (
        ("fds", "tab:orange", "open fds"),
        ("files", "tab:red", "regular files open"),
        ("upstream_connections", "tab:green", "upstream connections"),
        ("threads", "tab:purple", "threads"),
    ):
        descriptors.plot(minutes, [sample[key] for sample in samples], color=color, label=label)
    figures = document["figures"]
    for axes, key, unit in ((memory, "rss_mb", "MB"), (descriptors, "fds", "fds")):
        axes.axvspan(0, warmup, color="gray", alpha=0.15, label="warm-up")
        axes.axhline(figures[key]["start"], color="black", linestyle="--", linewidth=0.8, label="start")
        axes.set_ylabel(unit)
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best")
    verdict = document["verdict"]
    memory.set_title(
        f"RSS {figures['rss_mb']['start']} → {figures['rss_mb']['end']} MB "
        f"({'flat' if verdict['rss_flat'] else 'GROWING'}); login spikes up to "
        f"{figures['rss_mb']['peak']:.0f} MB cut off"
    )
    descriptors.set_title(
        f"fds {figures['fds']['start']:g} → {figures['fds']['end']:g} "
        f"({'flat' if verdict['fds_flat'] else 'GROWING'})"
    )
    descriptors.set_xlabel("minutes")
    descriptors.set_ylim(bottom=0)
    requests = sum(tally["count"] for tally in document["traffic"]["kinds"].values())
    figure.suptitle(
        f"Gateway soak, {document['date'][:10]}: {document['traffic']['workers']} workers, "
        f"{requests} requests of mixed traffic"
    )
    figure.tight_layout()
    _save(figure, path)
