"""docs/soak.png: every process's RSS over the run, its drift from where its fit starts, and
p50/p99 per window; the warm-up, the recycles, the kill and the weight changes marked."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.soak.memory import fit_from  # noqa: E402

STYLE = {"serving": "-", "": "-", "waiter": ":", "successor": "--"}


def _marks(ax: plt.Axes, doc: dict, legend: bool) -> None:
    ax.axvspan(0, doc["meta"]["warmup_s"], color="grey", alpha=0.12, label="warm-up (not fitted)" if legend else None)
    for n, r in enumerate(doc["recycles"]):
        ax.axvline(r["t"], color="green" if r["ok"] else "black", linestyle=":", linewidth=1.2,
                   label=("recycle" if r["ok"] else "recycle failed") if legend and n == 0 else None)
    kills = [e for e in doc["events"] if e["what"] == "kill -9" and e.get("pid")]
    for n, e in enumerate(kills):
        ax.axvline(e["t"], color="red", linewidth=1.5, label="kill -9" if legend and n == 0 else None)
    changes = [e for e in doc["events"] if e["what"] in ("weight change", "automatic rollback")]
    for n, e in enumerate(changes):
        ax.axvline(e["t"], color="darkorange", linestyle="--", linewidth=1.5,
                   label="weight change" if legend and n == 0 else None)


def _fitted(p: dict, warmup_s: float) -> list[list[float]]:
    """The samples a series is fitted on (memory.fit's rule)."""
    since = fit_from(p["kind"], p["samples"][0][0], warmup_s)
    return [s for s in p["samples"] if s[0] >= since]


def plot(doc: dict, path: Path) -> Path:
    fig, (rss, drift, lat) = plt.subplots(3, 1, figsize=(13, 12), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 2, 2]})
    colors: dict[str, str] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"] + ["#444444", "#8c564b", "#bcbd22", "#17becf"]
    warmup = doc["meta"]["warmup_s"]
    for p in doc["processes"]:
        family = p["label"].split(" (slot")[0]  # one colour per model version or process kind
        color = colors.setdefault(family, cycle[len(colors) % len(cycle)])
        style = STYLE.get(p["role"], "-")
        role = f", {p['role']}" if p["role"] and p["role"] != "serving" else ""
        xs, ys = [s[0] for s in p["samples"]], [s[1] for s in p["samples"]]
        rss.plot(xs, ys, color=color, linestyle=style, marker="." if len(xs) < 3 else None,
                 label=f"{family}{role} (pid {p['pid']})")
        fitted = _fitted(p, warmup)
        if fitted:
            drift.plot([s[0] for s in fitted], [s[1] - fitted[0][1] for s in fitted], color=color, linestyle=style)
        if p.get("heap_samples"):  # what of the JVM's RSS is its committed heap, which G1 sizes
            rss.plot([h[0] for h in p["heap_samples"]], [h[1] for h in p["heap_samples"]], color=color,
                     linestyle="-.", linewidth=1, label=f"{family}: Java heap committed")
    rss.set_ylabel("RSS, MiB")
    rss.set_ylim(bottom=0)
    rss.set_title(f"Soak: {doc['meta']['clients']} clients, {doc['meta']['minutes']:g} min, "
                  f"{doc['totals']['requests']:,} requests, {doc['totals']['failed']:,} failed")
    _marks(rss, doc, legend=True)
    rss.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    drift.set_ylabel("RSS change since its fit starts, MiB")
    drift.axhline(0, color="black", linewidth=0.5)
    _marks(drift, doc, legend=False)

    ws = doc["windows"]
    xs = [w["t"] for w in ws]
    lat.plot(xs, [w["p99_ms"] for w in ws], marker="o", markersize=3, label="p99")
    lat.plot(xs, [w["p50_ms"] for w in ws], marker="o", markersize=3, label="p50")
    failed = [(w["t"], w["p99_ms"]) for w in ws if w["failed"]]
    if failed:
        lat.scatter([t for t, _ in failed], [v for _, v in failed], color="red", zorder=5, s=40,
                    label="a window with failed requests")
    _marks(lat, doc, legend=False)
    lat.set_ylabel(f"latency per {ws[1]['t'] - ws[0]['t'] if len(ws) > 1 else 5:g} s window, ms")
    lat.set_xlabel("seconds into the load")
    lat.set_ylim(bottom=0)
    lat.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for ax in (rss, drift, lat):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
