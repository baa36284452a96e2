#!/usr/bin/env python3
"""What the A/B router costs: text-embedder (the real MiniLM) called directly and through
the router, at 16 and 64 concurrent connections, in one run.

    .venv/bin/python -m benchmarks.router_overhead [--seconds 15] [--runs 3]

Load comes from wrk (Debian package `wrk`) when it is installed, else from a Python
closed loop (which, on 2 cores, measures itself as much as the server). Each figure is the
median of --runs runs, direct and routed alternating; the spread is max - min. Writes
benchmarks/results/router_overhead.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import yaml

from benchmarks.harness import RouterProcessRunner, closed_loop, start_torchserve
from tsfleet.archive import Builder
from tsfleet.manifest import parse_fleet

ROOT = Path(__file__).resolve().parent.parent
BODY = b'{"text": "A short sentence about the weather in Lisbon today."}'


def wrk(url: str, headers: dict[str, str], clients: int, seconds: float, work: Path) -> dict:
    script = work / "post.lua"
    lines = ['wrk.method = "POST"', f"wrk.body = {json.dumps(BODY.decode())}"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(["wrk", "-t", "1", "-c", str(clients), "-d", f"{seconds:.0f}s", "--latency", "-s",
                          str(script), url], capture_output=True, text=True, timeout=seconds + 60).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)), "p50_ms": ms("50"),
            "p99_ms": ms("99"), "failed": int(errors.group(1)) if errors else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tsfleet-bench-router-"))
    doc = copy.deepcopy(yaml.safe_load((ROOT / "fleet.yaml").read_text()))
    doc["models"] = {"text-embedder": doc["models"]["text-embedder"]}
    doc["models"]["text-embedder"]["handler"] = str(ROOT / "handlers/text_embedder.py")
    doc["models"]["text-embedder"]["serving"] = {"workers": 2, "batch_size": 8, "max_batch_delay_ms": 5}
    doc["workflows"] = {}
    manifest = work / "fleet.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    fleet = parse_fleet(doc, ROOT)
    # The serving settings are packed into the archive too: build it for this fleet.
    Builder(fleet, work / "store", ROOT / "build" / "artifacts", progress=lambda line: None).build_all()
    ts = start_torchserve(fleet, work / "store", work / "ts")
    router = RouterProcessRunner(manifest, ts, work)
    headers = {**ts.keys.header("inference"), "Content-Type": "application/json"}
    tool = "wrk" if shutil.which("wrk") else "python"
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        targets = {"direct": ts.ep.url("inference"), "router": router.url}
        for name, url in targets.items():  # warm-up
            closed_loop(url + "/predictions/text-embedder", BODY, headers, 4, 3)
        for clients in (16, 64):
            for _ in range(args.runs):
                for name, url in targets.items():
                    full = url + "/predictions/text-embedder"
                    row = (wrk(full, headers, clients, args.seconds, work) if tool == "wrk"
                           else closed_loop(full, BODY, headers, clients, args.seconds).row())
                    results.setdefault(str(clients), {}).setdefault(name, []).append(row)
    finally:
        router.stop()
        ts.stop()

    print(f"\nRouter overhead on text-embedder (MiniLM, 2 workers, batch 8 / 5 ms), load from {tool}, "
          f"median of {args.runs} x {args.seconds:.0f} s (spread = max - min)\n")
    print(f"{'clients':>7} {'path':<7} {'req/s':>14} {'p50 ms':>14} {'p99 ms':>14} {'failed':>6}")
    summary = {}
    for clients, by_path in results.items():
        med = {}
        for name, rows in by_path.items():
            med[name] = {k: statistics.median(r[k] for r in rows) for k in ("rps", "p50_ms", "p99_ms")}
            spread = {k: max(r[k] for r in rows) - min(r[k] for r in rows) for k in ("rps", "p50_ms", "p99_ms")}
            print(f"{clients:>7} {name:<7} {med[name]['rps']:>8.1f} ±{spread['rps']:<5.0f}"
                  f"{med[name]['p50_ms']:>8.2f} ±{spread['p50_ms']:<5.1f}{med[name]['p99_ms']:>8.1f} ±{spread['p99_ms']:<5.0f}"
                  f"{sum(r['failed'] for r in rows):>6}")
        added = med["router"]["p50_ms"] - med["direct"]["p50_ms"]
        ratio = med["router"]["rps"] / med["direct"]["rps"]
        summary[clients] = {"p50_added_ms": added, "throughput_ratio": ratio}
        print(f"{'':>7} router adds {added:.2f} ms at p50 (bar < 1 ms); throughput {ratio:.0%} of direct (bar >= 90%)")
    out = ROOT / "benchmarks/results/router_overhead.json"
    out.write_text(json.dumps({"tool": tool, "seconds": args.seconds, "runs": args.runs, "results": results,
                               "summary": summary}, indent=2))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
