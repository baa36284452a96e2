"""PNG plots: throughput and p50/p99 latency against concurrency, one line per scenario."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402


def plot_model(model: str, entry: dict, path: Path) -> Path:
    """Three panels (req/s, p50, p99) for one model; the limit as a dashed line."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for name, row in entry.get("scenarios", {}).items():
        points = sorted((int(c), f) for c, f in row["by_concurrency"].items())
        xs = [c for c, _ in points]
        for ax, key in zip(axes, ("rps", "p50_ms", "p99_ms")):
            ax.plot(xs, [f[key] for _, f in points], marker="o", label=row["label"])
    limit = entry.get("limit")
    if limit:
        axes[0].axhline(limit["ceiling"], color="black", linestyle="--",
                        label=f"limit ({limit['processes']} processes x 1 thread, batch {limit['ceiling_batch']})")
    titles = (f"{model}: throughput ({entry.get('unit', 'items')}/s)", "p50 latency (ms)", "p99 latency (ms)")
    axes[0].set_ylim(bottom=0)
    return _save(fig, axes, titles, "lower right", path)


def _save(fig: plt.Figure, axes: list, titles: tuple[str, ...], legend: str, path: Path) -> Path:
    """Title each panel (concurrency on a log axis), put the legend on the first, write the PNG."""
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("concurrent clients")
        ax.set_xscale("log", base=2)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc=legend)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_hop(rows: list[dict], path: Path) -> Path:
    """The router hop benchmark: share of direct's throughput, added p50 and router CPU per
    request against concurrency, one line per (upstream, process count)."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    lines: dict[tuple[str, float, int, int], list[dict]] = {}
    for row in rows:
        lines.setdefault((row["protocol"], row["batch_ms"], row["processes"], row.get("body_bytes", 0)), []).append(row)
    sizes = {key[3] for key in lines}
    for (protocol, batch_ms, processes, size), points in sorted(lines.items()):
        points.sort(key=lambda r: r["clients"])
        label = f"{protocol}, " + ("answers at once" if not batch_ms else f"batches every {batch_ms:g} ms") + \
            f", {processes} process(es)" + (f", {size / 1024:.0f} KiB bodies" if len(sizes) > 1 else "")
        xs = [r["clients"] for r in points]
        for ax, key in zip(axes, ("ratio", "added_p50_ms", "router_cpu_us_per_request")):
            ax.plot(xs, [r[key] for r in points], marker="o", label=label)
    axes[0].axhline(0.9, color="black", linestyle="--", label="the bar: 0.9 of direct")
    for ax in axes:
        ax.set_ylim(bottom=0)
    return _save(fig, axes, ("routed / direct throughput", "added p50 (ms)", "router CPU per request (us)"),
                 "center", path)
