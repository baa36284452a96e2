"""One benchmark run: every scenario the options ask for, in the order that keeps the box's
state comparable (the in-process limit, the peers, the sweep, the fleet's rows, as shipped,
cold start). The scenarios themselves live in ``scenarios`` (tsfleet's) and ``peer_runs``."""
from __future__ import annotations

import os
import time

from benchmarks.speed import fleets, h2load, peer_runs
from benchmarks.speed.limit import run_limit
from benchmarks.speed.loadgen import HttpLoad
from benchmarks.speed.scenarios import Options, model_entry, run_main, run_sweep
from benchmarks.speed.workload import workload


def run_all(opts: Options) -> dict:
    """Every scenario opts asks for; returns the results document (without metadata)."""
    started = time.monotonic()
    load = HttpLoad(opts.load)
    opts.log(f"HTTP load from {load.tool}; {os.cpu_count()} CPUs; mode {opts.mode}")
    if {"grpc-direct", "router-grpc"} & opts.scenarios:
        missing = h2load.missing_reason()
        opts.results["h2load"] = {"version": h2load.version(), "missing": missing}
        opts.log(f"gRPC load from the project's client and from h2load {opts.results['h2load']['version']}" if not missing
                 else f"gRPC load from the project's client only: THE H2LOAD ROWS ARE MISSING: {missing}")
    fleets.ensure_artifacts(opts.models)
    workloads = [workload(m, opts.image_px) for m in opts.models]
    for w in workloads:
        entry = model_entry(opts, w.model)
        entry["unit"], entry["requests_in_set"] = w.unit, len(w.bodies)
        if "limit" in opts.scenarios:
            opts.log(f"limit: {w.model}, batches {opts.limit_batches}")
            entry["limit"] = run_limit(w.model, opts.limit_batches, opts.runs, opts.limit_seconds,
                                       image_px=opts.image_px)
            opts.log(f"  ceiling {entry['limit']['ceiling']:.1f} {w.unit}/s at batch {entry['limit']['ceiling_batch']}")
    if {"peer", "peers"} & opts.scenarios:
        for w in workloads if "peer" in opts.scenarios else ():
            peer_runs.run_tutorial_peer(opts, load, w)
        if "peers" in opts.scenarios:
            peer_runs.run_peers(opts, load, workloads, list(opts.peer_kinds))
    lap = _lap(opts, started)
    tuned = run_sweep(opts, load, workloads)
    lap("sweep")
    if {"toolkit-tuned", "router-rest", "router-grpc", "grpc-direct", "compiled", "minimal"} & opts.scenarios:
        run_main(opts, load, workloads, tuned)
        lap("tuned fleet")
    if "shipped" in opts.scenarios:
        peer_runs.run_shipped(opts, load, workloads)
        lap("shipped fleet")
    if "cold-start" in opts.scenarios:
        opts.log("cold start: the repo's fleet from model_store/")
        bodies = {w.model: (w.bodies[0], w.content_type) for w in workloads}
        try:
            opts.results["cold_start"] = fleets.cold_start(opts.work, bodies)
            opts.log(f"  ready in {opts.results['cold_start']['ready_s']:.1f} s")
        except Exception as exc:  # the figures measured so far are still worth writing
            opts.results.setdefault("errors", {})["cold-start"] = f"{type(exc).__name__}: {exc}"
            opts.log(f"  failed: {exc}")
    opts.results["load_tool"] = load.tool
    opts.results["duration_s"] = round(time.monotonic() - started, 1)
    return opts.results


def _lap(opts: Options, started: float):
    """A logger of each part's minutes (the full run has a time budget: docs/benchmarks-peers.md)."""
    last = [time.monotonic()]
    opts.log(f"  limit and peers took {(last[0] - started) / 60:.1f} min")

    def lap(what: str) -> None:
        now = time.monotonic()
        opts.log(f"  {what} took {(now - last[0]) / 60:.1f} min ({(now - started) / 60:.1f} min so far)")
        last[0] = now
    return lap
