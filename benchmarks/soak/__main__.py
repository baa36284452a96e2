"""The soak: ``python -m benchmarks.soak [--minutes 10] [--clients 64] [--out DIR]``.

Starts the fleet as `tsfleet up` does (TorchServe with every model and the workflow, the
router and the recycler; benchmarks/soak/fleet.py says why on free ports), in a temp folder,
on loopback only. Then --clients clients in a closed loop through the router, each sending its
requests to every path in turn (REST and gRPC per model, the workflow over REST), for
--minutes or --max-requests, whichever comes first. On the way (benchmarks/soak/timeline.py):
workers recycled (fleet.yaml's policy, or a max_age_s that falls due inside the run when it
sets none), the serving process of one worker killed with SIGKILL, and a canary put on with
`tsfleet rollout start` and taken off with `tsfleet rollout rollback`.

Every ~5 s it samples each process's RSS and prints the window's requests, failures and p99.
After the warm-up (the first 20% of the run; TorchServe's JVM from 180 s of load, its own
warm-up, see benchmarks/soak/memory.py) it fits a line to each process's RSS (a replaced
or killed worker's process starts a new series, per pid). Prints the summary and writes
DIR/benchmarks/results/soak.json, DIR/docs/soak.md and DIR/docs/soak.png (DIR: the repo).

Exit status 1 if a request failed, a process's RSS grew faster than --max-slope MiB/min after
the warm-up, or the run did not do what it says (no recycle, no kill, no weight change, a
version without ready workers at the end): usable as a gate. 2 if the fleet did not start.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.soak import report
from benchmarks.soak.fleet import ROOT, SoakFleet
from benchmarks.soak.load import Load
from benchmarks.soak.memory import Sampler
from benchmarks.soak.plot import plot
from benchmarks.soak.timeline import CANARY, WARMUP, Timeline
from tsfleet.errors import FleetError

SAMPLE_EVERY_S = report.WINDOW_S
# RSS growth allowed after the warm-up, per process. A real leak of a request's worth of
# tensors grows a worker by megabytes per second under this load, while the fleet's flat
# processes moved by under 0.2 MiB/min in the short runs (docs/reliability.md, "Last soak run").
MAX_SLOPE_MIB_PER_MIN = 2.0
READY_AT_END_S = 60.0  # for a worker restarted late in the run to come back before the final check


def say(line: str) -> None:
    print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the load (default 10)")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients (default 64)")
    parser.add_argument("--max-requests", type=int, default=1_000_000,
                        help="stop after this many requests even if --minutes has not passed")
    parser.add_argument("--max-slope", type=float, default=MAX_SLOPE_MIB_PER_MIN,
                        help=f"RSS growth allowed per process after the warm-up, MiB/min (default {MAX_SLOPE_MIB_PER_MIN:g})")
    parser.add_argument("--out", type=Path, default=ROOT, help="write docs/ and benchmarks/results/ under here")
    args = parser.parse_args(argv)
    seconds = args.minutes * 60
    meta = {"command": " ".join(["python -m benchmarks.soak", *argv]), "minutes": args.minutes,
            "clients": args.clients, "max_requests": args.max_requests, "max_slope_mib_per_min": args.max_slope,
            "warmup_s": round(WARMUP * seconds, 1), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    with tempfile.TemporaryDirectory(prefix="tsfleet-soak-") as tmp:
        fleet = SoakFleet(Path(tmp), say)
        try:
            say(f"starting the fleet in {tmp}")
            started = time.monotonic()
            try:
                fleet.start()
            except FleetError as exc:
                say(f"the fleet did not start: {exc}")
                return 2
            timeline = Timeline(fleet, seconds, 0.0, say)
            meta["recycling"] = fleet.add_recycling(timeline.recycle_due(), say)
            fleet.start_companions()
            say(f"fleet ready in {time.monotonic() - started:.0f} s; router at {fleet.router_url} and gRPC "
                f"{fleet.router_grpc}")
            meta["listeners"] = fleet.listeners()
            meta["plan"] = [{"t": round(t, 1), "what": what} for t, what in timeline.plan()]
            for item in meta["plan"]:
                say(f"  plan: {item['t']:6.1f} s  {item['what']}")
            doc = run(fleet, timeline, args, seconds, meta)
        finally:
            say("stopping the fleet")
            fleet.stop()
    doc["checks"] = report.checks(doc, args.max_slope)
    lines = report.tables(doc)
    say("\n" + "\n".join(lines))
    write(doc, lines, args.out)
    bad = [c["check"] for c in doc["checks"] if not c["ok"]]
    say("\nsoak " + ("FAILED: " + "; ".join(bad) if bad else "passed"))
    return 1 if bad else 0


def run(fleet: SoakFleet, timeline: Timeline, args: argparse.Namespace, seconds: float, meta: dict) -> dict:
    """The load, the timeline and the sampler, until the load ends; the figures."""
    sampler = Sampler()
    t0 = time.monotonic()
    wall_t0 = time.time()
    timeline.t0 = t0
    load = Load(fleet.router_url, fleet.router_grpc, fleet.router_key("inference"), args.clients, t0 + seconds,
                args.max_requests, t0)
    load.start()
    timeline.start()
    seen = 0
    try:
        while load.is_alive():
            now = time.monotonic() - t0
            sampler.sample(now, fleet.processes())
            fleet.check_companions()
            window = load.records[seen:]
            seen += len(window)
            p99 = report.pct([r[1] for r in window], 0.99)
            say(f"  [{now:6.1f} s] {len(load.records):,} requests, {sum(1 for r in window if r[3])} failed in the "
                f"last window, p99 {p99 if p99 is not None else '-'} ms, "
                f"{sum(1 for r in fleet.recycles() if r.get('ok'))} recycles so far")
            load.join(timeout=max(0.0, t0 + (int(now // SAMPLE_EVERY_S) + 1) * SAMPLE_EVERY_S - time.monotonic()))
    except KeyboardInterrupt:
        load.stop.set()
        raise
    finally:
        timeline.join()
    if load.crashed is not None:
        raise RuntimeError(f"the load generator stopped: {load.crashed!r}") from load.crashed
    took = max((r[0] for r in load.records), default=0.0)
    sampler.sample(time.monotonic() - t0, fleet.processes())
    recycles = [{**r, "t": round(r["at"] - wall_t0, 1)} for r in fleet.recycles()]
    doc = {"meta": meta, **report.requests_part(load.records, load.targets, took), "events": timeline.events,
           "recycles": recycles, "errors": load.errors,
           "canary": report.canary_part(load.records, load.targets, timeline.events, CANARY[0]),
           "processes": report.memory_part(sampler, WARMUP * seconds, args.max_slope, timeline.events, recycles),
           "not_ready_at_end": not_ready(fleet)}
    doc["meta"]["seconds"] = round(took, 1)
    return doc


def not_ready(fleet: SoakFleet) -> list[str]:
    """Versions without all their workers ready, after up to READY_AT_END_S."""
    deadline = time.monotonic() + READY_AT_END_S
    while True:
        missing = []
        for v in fleet.fleet.versions():
            states = {s.version: s for s in fleet.ts.client.describe(v.model)}
            have = states[v.version].ready_workers if v.version in states else 0
            if have < v.serving.workers:
                missing.append(f"{v.model} {v.version} ({have}/{v.serving.workers})")
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(1)


def write(doc: dict, lines: list[str], out: Path) -> None:
    data, md, png = out / "benchmarks" / "results" / "soak.json", out / "docs" / "soak.md", out / "docs" / "soak.png"
    for path in (data, md):
        path.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, png)
    m = doc["meta"]
    md.write_text("\n".join([
        "# Soak: the whole fleet under load, with recycling, a worker kill and a canary", "",
        f"Written by `{m['command']}` on {m['date']}: {m['cpu_count']} cores, {m['memory_gib']:g} GiB, "
        f"Python {m['python']}. {m['clients']} clients in a closed loop through the router for "
        f"{m['seconds']:.0f} s, each sending its requests to every path in turn; every answer checked (status and "
        "the answer's field; over gRPC an OK reply carrying TorchServe's JSON error body counts as failed). "
        f"Memory: RSS of every process every {SAMPLE_EVERY_S:g} s; its Theil-Sen slope from the end of the warm-up "
        f"({m['warmup_s']:g} s) on, per process (a replaced or killed worker's process starts a new series; "
        "TorchServe's JVM is judged outside its committed heap); the gate allows "
        f"{m['max_slope_mib_per_min']:g} MiB/min. How the figures are made: `benchmarks/soak/`. Data: "
        "`benchmarks/results/soak.json`; what each scenario promises: [reliability.md](reliability.md).", "",
        *lines, "", "![RSS per process and latency over the run](soak.png)", ""]))
    for path in (data, md, png):
        say(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
