"""How the router's throughput grows with its processes (``--router-processes 1 2 3``).

One TorchServe serves the tuned fleet; a router with each process count in turn stands in
front of it. At every concurrency, direct and routed REST and gRPC are measured interleaved
(so a slow minute lands on both), and the router's CPU per request comes with each row.
Written as benchmarks/results/router-processes.json and docs/benchmarks-router-processes.md.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from benchmarks.harness import RouterProcessRunner
from benchmarks.speed import fleets
from benchmarks.speed.cpu import BusyMeter, CpuMeter, split_cores
from benchmarks.speed.fleets import Serve, Variant
from benchmarks.speed.loadgen import HttpLoad
from benchmarks.speed.scenarios import Options, grpc_target, http_target, measure
from benchmarks.speed.workload import Workload, requests_text, workload

BAR = 0.9  # routed throughput at least this share of direct


def run_processes(opts: Options, counts: list[int]) -> dict:
    """The whole run: the models' first serving configuration, a router of each count."""
    load = HttpLoad(opts.load)
    opts.log(f"HTTP load from {load.tool}; {os.cpu_count()} CPUs; router processes {counts}")
    fleets.ensure_artifacts(opts.models)
    workloads = [workload(m, opts.image_px) for m in opts.models]
    tuned = {w.model: opts.sweep[w.model][0] for w in workloads}
    return {**run_process_sweep(opts, load, workloads, tuned, counts), "load_tool": load.tool}


def run_process_sweep(opts: Options, load: HttpLoad, workloads: list[Workload], tuned: dict[str, Serve],
                      counts: list[int]) -> dict:
    """Direct against a router of each process count in ``counts``; returns the rows."""
    if opts.split_cores:
        tuned = fleets.one_worker_per_cpu_of_half(tuned)
    variants = [Variant(w.model, "1.0", tuned[w.model]) for w in workloads]
    fleet, store, manifest = fleets.build(variants, opts.work / "main")
    out: dict = {"counts": counts, "models": {}}
    with fleets.serving(fleet, store, opts.work / "main" / "ts") as (ts, ready_s), contextlib.ExitStack() as stack:
        opts.log(f"  ready in {ready_s:.1f} s")
        front = fleets.frontend_pid(ts)
        workers = fleets.worker_pids(ts)
        if opts.split_cores:
            # Routers started later inherit this process's CPUs: the serving half.
            out["split_cores"] = stack.enter_context(split_cores(workers, [front] if front else []))
            opts.log(f"  workers on CPUs {out['split_cores']['workers']}; "
                     f"frontend, routers and load on CPUs {out['split_cores']['serving']}")
        # Whether the serving path's CPUs were all busy says if a router process more could help.
        busy = BusyMeter(set(out["split_cores"]["serving"]) if opts.split_cores else os.sched_getaffinity(0))
        base, key, auth = ts.ep.url("inference"), ts.keys.inference, ts.keys.header("inference")
        direct_grpc = f"127.0.0.1:{ts.ep.grpc_inference}"
        for count in counts:
            router = RouterProcessRunner(manifest, ts.config, opts.work / "main", count)
            try:
                meter = CpuMeter({"router": router.pids})
                for w in workloads:
                    targets = {
                        "rest-direct": http_target(load, base + f"/predictions/{w.model}", w, auth),
                        "rest-router": meter.wrap("rest-router", http_target(
                            load, router.url + f"/predictions/{w.model}", w, auth)),
                        "grpc-direct": grpc_target(direct_grpc, w, key),
                        "grpc-router": meter.wrap("grpc-router", grpc_target(router.grpc, w, key)),
                    }
                    targets = {name: busy.wrap(name, t) for name, t in targets.items()}
                    for clients in opts.concurrency:
                        figures = measure(targets, opts, clients, on_warm=lambda: (meter.reset(), busy.reset()))
                        row = {}
                        for proto in ("rest", "grpc"):
                            d, r = figures[f"{proto}-direct"], figures[f"{proto}-router"]
                            cpu = meter.per_request(f"{proto}-router")
                            row[proto] = {"direct": d, "router": r,
                                          "ratio": round(r["rps"] / d["rps"], 3) if d["rps"] else 0.0,
                                          "router_cpu_ms_per_request": round(
                                              cpu.get("router_user_ms", 0) + cpu.get("router_sys_ms", 0), 3),
                                          "serving_cpus_busy": {"direct": busy.share(f"{proto}-direct"),
                                                                "router": busy.share(f"{proto}-router")}}
                            opts.log(f"  {w.model:<16} {count} router process(es) {proto:<4} c={clients:<3} direct "
                                     f"{d['rps']:8.1f} req/s | router {r['rps']:8.1f} req/s | ratio "
                                     f"{row[proto]['ratio']:.3f}, router CPU {row[proto]['router_cpu_ms_per_request']:.3f} ms/request; "
                                     f"serving CPUs busy {_pct(row[proto]['serving_cpus_busy']['direct'])} direct, "
                                     f"{_pct(row[proto]['serving_cpus_busy']['router'])} routed")
                        out["models"].setdefault(w.model, {}).setdefault(str(count), {})[str(clients)] = row
            finally:
                router.stop()
    return out


def _pct(share: float | None) -> str:
    return "?" if share is None else f"{share:.0%}"


def table(doc: dict) -> list[str]:
    """One markdown row per model, concurrency and protocol; a column per process count."""
    counts = doc["counts"]
    lines = ["| model | clients | protocol | direct | "
             + " | ".join(f"{n} process{'es' if n > 1 else ''}" for n in counts) + " |",
             "|---|---:|---|---:|" + "---:|" * len(counts)]
    for model, by_count in doc["models"].items():
        clients_seen = list(next(iter(by_count.values())))
        for clients in clients_seen:
            for proto in ("rest", "grpc"):
                rows = [by_count[str(n)][clients][proto] for n in counts]
                # Direct was measured once per process count; its median across them is the fair column.
                mid = sorted(range(len(rows)), key=lambda i: rows[i]["direct"]["rps"])[len(rows) // 2]
                direct = f"{rows[mid]['direct']['rps']:.0f}, {_pct(rows[mid]['serving_cpus_busy']['direct'])}"
                cells = [f"{r['router']['rps']:.0f} ({r['ratio']:.2f}{'' if r['ratio'] >= BAR else ' miss'}), "
                         f"{r['router_cpu_ms_per_request']:.2f} ms, {_pct(r['serving_cpus_busy']['router'])}"
                         for r in rows]
                lines.append(f"| {model} | {clients} | {proto.upper() if proto == 'rest' else 'gRPC'} | "
                             f"{direct} | " + " | ".join(cells) + " |")
    return lines


def write(doc: dict, out_dir: Path, suffix: str | None = None) -> list[Path]:
    """router-processes.json and benchmarks-router-processes.md under ``out_dir`` (with
    ``-{suffix}`` before the extension, when given)."""
    docs, results = out_dir / "docs", out_dir / "benchmarks" / "results"
    docs.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    stem = "router-processes" + (f"-{suffix}" if suffix else "")
    data, text = results / f"{stem}.json", docs / f"benchmarks-{stem}.md"
    data.write_text(json.dumps(doc, indent=2) + "\n")
    meta = doc["meta"]
    layout = doc.get("split_cores")
    text.write_text("\n".join([
        "# Router throughput by its number of processes",
        "",
        f"`{meta['command']}` on {meta['cpu_count']} CPUs ({meta['cpu_model']}), "
        f"{'GPU ' + str(meta['gpu_name']) if meta.get('gpu') else 'no GPU'}, load from {meta['load_tool']}, "
        f"{meta['date']}.",
        "",
        *([f"The model workers ran on CPU(s) {layout['workers']}; TorchServe's frontend, the router and the load "
           f"generator on CPU(s) {layout['serving']}.", ""] if layout else []),
        "Direct: requests per second straight to TorchServe, and how busy the serving path's CPUs were. "
        "Each router cell: requests per second through a router of that many processes, its ratio to direct "
        f"in the same interleaved runs (the bar is {BAR:.2f}), the router's CPU per request (all its processes), "
        "and how busy the serving path's CPUs were. A miss with those CPUs all busy is the router's cost "
        "competing with TorchServe's frontend for the same cores; one with CPUs to spare is the router's own "
        f"limit. Data: [{data.name}](../benchmarks/results/{data.name}).",
        "",
        requests_text(meta.get("image_px", 64)),
        "",
        *table(doc),
        "",
    ]))
    return [data, text]
