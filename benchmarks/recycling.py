#!/usr/bin/env python3
"""Worker recycling under load: failures and latency, through the router and direct, and
the memory of a leaking worker over time with and without a max_rss policy.

    .venv/bin/python -m benchmarks.recycling [--seconds 60] [--recycles-per-worker 3]

Prints a table, writes benchmarks/results/recycling.json and docs/recycling_leak.png.
Uses the test-only leaking model (tests/fixtures/leaky_handler.py): 2 workers, batch 1.
On 2 cores the load generator, the router and TorchServe share the CPU: compare rows of
one run only.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import yaml

from tests.fixtures.leaky import leaky_manifest
from benchmarks.harness import RouterProcessRunner, closed_loop, start_torchserve
from tsfleet.build.archive import Builder
from tsfleet.manifest import Fleet, parse_fleet
from tsfleet.control.recycle import Recycler, read_reports

ROOT = Path(__file__).resolve().parent.parent
LEAK_KB = 100  # a slow leak, as real ones are: 1 GB per ~10,000 requests


def leaky_fleet(report_dir: Path, **recycle: int) -> Fleet:
    return parse_fleet(leaky_manifest(report_dir, LEAK_KB, 2, **recycle), ROOT)


class RecyclerThread:
    """The recycler ticking in the background, plus (optionally) a memory sampler."""

    def __init__(self, fleet: Fleet, ts, reports: Path, sample: list | None = None):
        self.recycler = Recycler(fleet, ts.client, reports, progress=lambda line: None)
        self.stop, self.reports = threading.Event(), reports
        self.started = time.monotonic()
        self.threads = [threading.Thread(target=self.tick)]
        if sample is not None:
            # Its own thread: a replacement blocks a tick for seconds, sampling must go on.
            self.threads.append(threading.Thread(target=self.sample, args=(sample,)))
        for t in self.threads:
            t.start()

    def tick(self) -> None:
        while not self.stop.wait(0.2):
            if any(v.recycle.enabled for v in self.recycler.fleet.versions()):
                self.recycler.tick()

    def sample(self, out: list) -> None:
        while not self.stop.wait(0.1):
            rss = [r.rss_mb for r in read_reports(self.reports, "leaky", "1.0").values()]
            if rss:
                out.append((time.monotonic() - self.started, max(rss)))

    def close(self) -> int:
        self.stop.set()
        for t in self.threads:
            t.join()
        return sum(e.ok for e in self.recycler.events)


def fresh_workers(ts, fleet: Fleet) -> None:
    ts.client.scale("leaky", "1.0", 0)
    ts.client.scale("leaky", "1.0", 2)
    ts.wait_ready(fleet, timeout=120, progress=lambda line: None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each load phase")
    parser.add_argument("--recycles-per-worker", type=float, default=3.0,
                        help="max_requests is set from the steady rate so each worker recycles this often per phase")
    parser.add_argument("--leak-seconds", type=float, default=60.0, help="length of each leak-demo phase")
    parser.add_argument("--clients", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tsfleet-bench-recycle-"))
    reports = work / "reports"
    base = leaky_fleet(reports)
    Builder(base, work / "store", work / "cache", progress=lambda line: None).build_all()
    ts = start_torchserve(base, work / "store", work / "ts")
    manifest = work / "fleet.yaml"
    manifest.write_text(yaml.safe_dump(leaky_manifest(reports, LEAK_KB, 2)))
    router = RouterProcessRunner(manifest, ts.config, work)
    headers = {**ts.keys.header("inference"), "Content-Type": "application/json"}
    body = b'{"ping": 1}'
    rows: dict[str, dict] = {}
    try:
        closed_loop(router.url + "/predictions/leaky", body, headers, 4, 3)  # warm-up
        rows["steady, via router"] = closed_loop(router.url + "/predictions/leaky", body, headers,
                                                 args.clients, args.seconds).row()
        # "Recycles every worker several times": limits from the rate each of the 2 workers saw.
        per_worker = rows["steady, via router"]["rps"] / 2 * args.seconds
        max_requests = max(50, int(per_worker / (args.recycles_per_worker + 0.5)))
        policy = leaky_fleet(reports, max_requests=max_requests, max_requests_jitter=max_requests // 5)
        print(f"policy: max_requests {max_requests} (jitter {max_requests // 5}): about "
              f"{args.recycles_per_worker:.0f} recycles per worker per {args.seconds:.0f} s phase")
        for name, url in (("recycling, via router", router.url), ("recycling, direct", ts.ep.url("inference"))):
            watcher = RecyclerThread(policy, ts, reports)
            result = closed_loop(url + "/predictions/leaky", body, headers, args.clients, args.seconds)
            rows[name] = {**result.row(), "recycles": watcher.close()}
        curves: dict[str, list] = {}
        ceiling = 0
        for name in ("no recycling", "max_rss"):
            fresh_workers(ts, base)
            fleet = base
            if name == "max_rss":
                baseline = max(r.rss_mb for r in read_reports(reports, "leaky", "1.0").values())
                ceiling = int(baseline + 150)
                fleet = leaky_fleet(reports, max_rss_mb=ceiling)
                name = f"max_rss {ceiling} MB"
            samples: list[tuple[float, float]] = []
            watcher = RecyclerThread(fleet, ts, reports, samples)
            result = closed_loop(router.url + "/predictions/leaky", body, headers, 4, args.leak_seconds)
            rows[f"leak demo, {name}"] = {**result.row(), "recycles": watcher.close(),
                                          "peak_worker_rss_mb": round(max(m for _, m in samples), 1)}
            curves[name] = samples
    finally:
        router.stop()
        ts.stop()

    steady_p99 = rows["steady, via router"]["p99_ms"]
    print(f"\nWorker recycling, {args.clients} clients, {args.seconds:.0f} s per phase "
          f"(leaky test model, 2 workers; {platform.processor() or platform.machine()}, 2-core box)\n")
    print(f"{'phase':<34} {'requests':>8} {'failed':>6} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'recycles':>8} {'peak RSS MB':>11}")
    for name, row in rows.items():
        print(f"{name:<34} {row['requests']:>8} {row['failed']:>6} {row['rps']:>7} {row['p50_ms']:>7} "
              f"{row['p99_ms']:>7} {row.get('recycles', ''):>8} {row.get('peak_worker_rss_mb', ''):>11}")
    ratio = rows["recycling, via router"]["p99_ms"] / steady_p99
    print(f"\np99 while recycling via the router: {ratio:.2f}x the steady p99 (bar: 1.5x)")
    for name, row in rows.items():
        for error in row.get("errors", []):
            print(f"failed in {name!r} at {error}")
    out = ROOT / "benchmarks/results/recycling.json"
    out.write_text(json.dumps({"rows": rows, "p99_ratio": ratio, "clients": args.clients,
                               "seconds": args.seconds, "max_requests": max_requests,
                               "leak_kb_per_request": LEAK_KB}, indent=2))
    plot(curves, ceiling, ROOT / "docs/recycling_leak.png")
    print(f"wrote {out.relative_to(ROOT)} and docs/recycling_leak.png")


def plot(curves: dict[str, list[tuple[float, float]]], ceiling: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, samples in curves.items():
        ax.plot([t for t, _ in samples], [m for _, m in samples], label=name)
    ax.axhline(ceiling, color="grey", linestyle="--", label="max_rss ceiling")
    ax.set_xlabel("seconds under load (4 clients through the router)")
    ax.set_ylabel("largest worker RSS, MB")
    ax.set_title(f"Workers leaking {LEAK_KB} KB per request")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
