"""The run: every scenario on every model, in one process, in a fixed order.

Scenarios that share a server are measured interleaved (run 1 of each, then run 2 ...), so
a slow minute of a noisy machine lands on all of them rather than on one.
"""
from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from benchmarks.harness import RouterProcessRunner
from benchmarks.speed import fleets, h2load
from benchmarks.speed.cpu import CpuMeter, split_cores
from benchmarks.speed.fleets import Serve, Variant
from benchmarks.speed.h2load_target import H2loadTarget
from benchmarks.speed.limit import peak_rss_mb
from benchmarks.speed.loadgen import HttpLoad, Sample, run_grpc, run_grpc_side_by_side
from benchmarks.speed.workload import Workload, answer_check

ALL = ("limit", "peer", "toolkit-b1", "toolkit-tuned", "router-rest", "grpc-direct", "router-grpc",
       "compiled", "minimal", "cold-start", "peers", "shipped")
LABELS = {
    "peer": "FastAPI + uvicorn (peer)",
    "toolkit-b1": "TorchServe + toolkit, batch 1",
    "toolkit-tuned": "TorchServe + toolkit, tuned",
    "router-rest": "tuned, through the router (REST)",
    "grpc-direct": "tuned, gRPC direct",
    "router-grpc": "tuned, through the router (gRPC)",
    "grpc-direct-h2load": "tuned, gRPC direct (h2load)",
    "router-grpc-h2load": "tuned, through the router (gRPC, h2load)",
    "compiled": "tuned + torch.compile + bf16",
    "minimal": "minimal hand-written handler",
    "shipped": "tsfleet as `make up` ships it, direct",
    "shipped-router": "tsfleet as `make up` ships it, through the router",
    "fastapi-default": "FastAPI + uvicorn, sync def, 1 worker (tutorial default)",
    "fastapi": "FastAPI + uvicorn, best layout",
    "litserve": "LitServe, batching",
    "mosec": "mosec, batching",
    "ray": "Ray Serve, @serve.batch",
}
Target = Callable[..., Sample]  # (clients, seconds, think_s=0.0) -> Sample
# (clients, seconds, think_s=0.0) -> one Sample per side, all loaded in the same window
PairTarget = Callable[..., "list[Sample]"]
# Scenarios whose CPU per request is broken down by process (the router's cost, explained).
METERED = ("toolkit-tuned", "router-rest", "grpc-direct", "router-grpc", "grpc-direct-h2load", "router-grpc-h2load",
           "compiled", "minimal")
WARMUP_WINDOWS = 6
# The router's added latency is measured at this share of direct's closed-loop capacity:
# a busy server, but one whose clients are not all queueing for a core.
PACED_SHARE = 0.5
OVERHEAD_PAIRS = (("REST", "toolkit-tuned", "router-rest"), ("gRPC", "grpc-direct", "router-grpc"))


@dataclass
class Options:
    """What one run measures and for how long."""

    models: list[str]
    scenarios: set[str]
    concurrency: list[int]
    runs: int
    seconds: float
    warmup: float
    limit_batches: list[int]
    limit_seconds: float
    sweep: dict[str, list[Serve]]
    batch1: Serve
    minimal: Serve
    load: str
    work: Path
    mode: str
    log: Callable[[str], None] = print
    results: dict = field(default_factory=dict)
    split_cores: bool = False  # workers on half the CPUs, the serving path on the rest
    router_processes: int = 1
    image_px: int = 64  # the image requests' side: 64 is the model's own size (see shape_images)
    overhead: bool = True  # the router's paced and side-by-side added-latency windows
    peer_kinds: tuple[str, ...] = ()  # the peers (peers/KINDS) the "peers" scenario runs
    sweep_concurrency: list[int] | None = None  # the sweep's levels (tsfleet's and the peers'); default: concurrency
    sweep_warmup: float | None = None  # the sweep's warm-up windows (a ranking, not a figure); default: warmup

    def runs_at(self, clients: int) -> int:
        """Timed runs at a level: ``runs`` where the sweep (and the bars) read it, one elsewhere
        (the curves' low end): the full peers run has a time budget."""
        return self.runs if not self.sweep_concurrency or clients in self.sweep_concurrency else 1


def summarize(samples: list[Sample]) -> dict:
    """Median and spread (max - min) of each figure over runs, plus totals."""
    out: dict = {}
    for key in ("rps", "p50_ms", "p99_ms"):
        values = [getattr(s, key) for s in samples]
        out[key] = round(statistics.median(values), 2)
        out[key.replace("_ms", "") + "_spread"] = round(max(values) - min(values), 2)
    out["requests"] = sum(s.requests for s in samples)
    out["failed"] = sum(s.failed for s in samples)
    out["runs"] = [s.as_dict() for s in samples]
    return out


def warm(targets: dict[str, Target], opts: Options, clients: int, settle: bool = False,
         seconds: float | None = None) -> None:
    """Run each target until two warm-up windows (``seconds``, else opts.warmup) in a row agree
    within 15%; with ``settle`` (warm already, at another level), one window: the queues reach
    this level's depth."""
    for run in targets.values():
        last = 0.0
        for _ in range(1 if settle else WARMUP_WINDOWS):
            rps = run(clients, seconds or opts.warmup).rps
            if rps > 0 and last > 0 and abs(rps - last) <= 0.15 * max(rps, last):
                break
            last = rps


def measure(targets: dict[str, Target], opts: Options, clients: int, runs: int | None = None,
            on_warm: Callable[[], None] | None = None, settle: bool = False,
            sweep: bool = False) -> dict[str, dict]:
    """Warm each target up until it is steady, then ``runs`` timed windows per target, interleaved.

    Steady: two warm-up windows in a row within 15% of each other. A target still compiling
    new shapes (torch.compile) burns CPU the other targets would see in their windows.
    ``settle``: the targets were warmed at an earlier level of this run (same processes), so
    one warm-up window each (a noisy peer could otherwise take six windows at every level).
    ``sweep``: a sweep's ranking, warmed with opts.sweep_warmup windows.
    """
    runs = runs or opts.runs_at(clients)
    warm(targets, opts, clients, settle, opts.sweep_warmup if sweep else None)
    if on_warm:
        on_warm()
    samples: dict[str, list[Sample]] = {name: [] for name in targets}
    for _ in range(runs):
        for name, run in targets.items():
            samples[name].append(run(clients, opts.seconds))
    return {name: summarize(s) for name, s in samples.items()}


def measure_overhead(targets: dict[str, Target], figures: dict[str, dict], opts: Options,
                     clients: int) -> dict[str, dict]:
    """Direct and routed under the same paced load (PACED_SHARE of direct's capacity at this
    concurrency), interleaved; the added latency is the median of the paired differences."""
    out = {}
    for proto, direct, routed in OVERHEAD_PAIRS:
        if direct not in targets or routed not in targets or not figures.get(direct, {}).get("rps"):
            continue
        capacity = figures[direct]["rps"]
        think = clients / (PACED_SHARE * capacity)
        # Enough answers for a steady p50 even at a low rate; CI's smoke run stays short.
        seconds = opts.seconds if opts.mode == "smoke" else max(opts.seconds, min(10.0, 600 / (PACED_SHARE * capacity)))
        pairs: list[tuple[Sample, Sample]] = []
        for _ in range(opts.runs):
            pairs.append((targets[direct](clients, seconds, think), targets[routed](clients, seconds, think)))
        d, r = summarize([p[0] for p in pairs]), summarize([p[1] for p in pairs])
        row = {"capacity_rps": capacity, "share": PACED_SHARE, "think_ms": round(think * 1000, 2),
               "seconds": seconds, "direct": d, "router": r,
               "added_p50_ms": round(statistics.median(b.p50_ms - a.p50_ms for a, b in pairs), 2),
               "added_p99_ms": round(statistics.median(b.p99_ms - a.p99_ms for a, b in pairs), 2)}
        out[proto] = row
        opts.log(f"  paced {proto:<4} c={clients:<3} direct {d['rps']:7.1f} req/s p50 {d['p50_ms']:6.2f} ms | router "
                 f"{r['rps']:7.1f} req/s p50 {r['p50_ms']:6.2f} ms | added p50 {row['added_p50_ms']:+.2f} ms")
    return out


def _paired(pairs: list[list[Sample]]) -> dict:
    a, b = summarize([p[0] for p in pairs]), summarize([p[1] for p in pairs])
    return {"a": a, "b": b,
            "added_p50_ms": round(statistics.median(q[1].p50_ms - q[0].p50_ms for q in pairs), 2),
            "added_p99_ms": round(statistics.median(q[1].p99_ms - q[0].p99_ms for q in pairs), 2)}


def measure_side_by_side(pairs: dict[str, tuple[PairTarget, PairTarget]], figures: dict[str, dict],
                         opts: Options, clients: int) -> dict[str, dict]:
    """Direct and routed clients in the same window, half the clients each, paced (as in
    measure_overhead) and saturated; and the same paced window with both halves direct (A/A),
    whose difference is what this method reads when there is no router at all."""
    out = {}
    for proto, direct, _ in OVERHEAD_PAIRS:
        if proto not in pairs or not figures.get(direct, {}).get("rps"):
            continue
        routed, same = pairs[proto]
        think = clients / (PACED_SHARE * figures[direct]["rps"])
        # Each side gets half the clients: twice the window for as many answers as a solo run.
        seconds = opts.seconds if opts.mode == "smoke" else 2 * max(
            opts.seconds, min(10.0, 600 / (PACED_SHARE * figures[direct]["rps"])))
        row = {"think_ms": round(think * 1000, 2), "seconds": seconds}
        for name, target, t, secs in (("paced", routed, think, seconds), ("aa", same, think, seconds),
                                      ("saturated", routed, 0.0, opts.seconds)):
            row[name] = _paired([target(clients, secs, t) for _ in range(opts.runs)])
        out[proto] = row
        opts.log(f"  side by side {proto:<4} c={clients:<3} added p50 paced {row['paced']['added_p50_ms']:+.2f} ms, "
                 f"saturated {row['saturated']['added_p50_ms']:+.2f} ms; A/A {row['aa']['added_p50_ms']:+.2f} ms")
    return out


def model_entry(opts: Options, model: str) -> dict:
    return opts.results.setdefault("models", {}).setdefault(model, {})


def _record(opts: Options, model: str, scenario: str, clients: int, figures: dict, **extra: object) -> None:
    row = model_entry(opts, model).setdefault("scenarios", {}).setdefault(
        scenario, {"label": LABELS[scenario], "by_concurrency": {}})
    row["by_concurrency"][str(clients)] = figures
    row.update(extra)
    opts.log(f"  {model:<16} {scenario:<14} c={clients:<3} {figures['rps']:8.1f} req/s  p50 {figures['p50_ms']:7.1f} ms"
             f"  p99 {figures['p99_ms']:7.1f} ms  failed {figures['failed']}")
    for error in sorted({r["detail"]["error"] for r in figures.get("runs", []) if r.get("detail", {}).get("error")}):
        opts.log(f"  {model:<16} {scenario:<14} measured nothing: {error}")


def http_target(load: HttpLoad, url: str, w: Workload, headers: dict[str, str]) -> Target:
    """Closed-loop HTTP load on ``url``; every answer checked (answer_check)."""
    hdrs, check = {**headers, "Content-Type": w.content_type}, answer_check(w.model)
    return lambda clients, seconds, think_s=0.0: load(url, w.items, hdrs, clients, seconds, think_s, check)


def grpc_target(address: str, w: Workload, key: str) -> Target:
    return lambda clients, seconds, think_s=0.0: run_grpc(address, w.model, w.items, key, clients, seconds, think_s)


def http_pair(load: HttpLoad, urls: list[str], w: Workload, headers: dict[str, str]) -> PairTarget:
    hdrs = {**headers, "Content-Type": w.content_type}
    return lambda clients, seconds, think_s=0.0: load.side_by_side(urls, w.items, hdrs, clients, seconds, think_s)


def grpc_pair(addresses: list[str], w: Workload, key: str) -> PairTarget:
    return lambda clients, seconds, think_s=0.0: run_grpc_side_by_side(addresses, w.model, w.items, key, clients,
                                                                       seconds, think_s)


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(max(v, 1e-9)) for v in values) / len(values))


def run_sweep(opts: Options, load: HttpLoad, workloads: list[Workload]) -> dict[str, Serve]:
    """Serve batch 1 and every sweep candidate in one TorchServe; pick each model's best."""
    chosen = {w.model: opts.sweep[w.model][0] for w in workloads}
    want_b1 = "toolkit-b1" in opts.scenarios
    if not want_b1 and all(len(opts.sweep[w.model]) == 1 for w in workloads):
        return chosen
    variants = []
    for w in workloads:
        if want_b1:
            variants.append(Variant(w.model, "1.0", opts.batch1))
        variants += [Variant(w.model, f"2.{i}", s) for i, s in enumerate(opts.sweep[w.model])]
    opts.log(f"sweep server: {len(variants)} versions")
    fleet, store, _ = fleets.build(variants, opts.work / "sweep")
    with fleets.serving(fleet, store, opts.work / "sweep" / "ts") as (ts, _):
        base = ts.ep.url("inference")
        auth = ts.keys.header("inference")
        for w in workloads:
            mine = [v for v in variants if v.model == w.model]
            if want_b1:
                for i, clients in enumerate(opts.concurrency):
                    figures = measure({"b1": http_target(load, base + mine[0].path(), w, auth)}, opts, clients,
                                      settle=i > 0)["b1"]
                    _record(opts, w.model, "toolkit-b1", clients, figures, config=opts.batch1.as_dict(),
                            peak_rss_mb=fleets.worker_rss(ts, w.model, "1.0"))
            candidates = [v for v in mine if v.version.startswith("2.")]
            if len(candidates) < 2:
                continue
            table = []
            for v in candidates:
                by_c = {str(c): measure({"x": http_target(load, base + v.path(), w, auth)}, opts, c, runs=1,
                                        settle=i > 0, sweep=True)["x"]
                        for i, c in enumerate(opts.sweep_concurrency or opts.concurrency)}
                score = _geomean([r["rps"] for r in by_c.values()])
                table.append({"config": v.serve.as_dict(), "label": v.serve.label(), "score_rps": round(score, 1),
                              "by_concurrency": {c: {k: r[k] for k in ("rps", "p50_ms", "p99_ms", "failed")}
                                                 for c, r in by_c.items()}})
                opts.log(f"  sweep {w.model:<16} {v.serve.label():<36} {score:8.1f} req/s (geometric mean)")
            best = max(range(len(table)), key=lambda i: table[i]["score_rps"])
            chosen[w.model] = candidates[best].serve
            model_entry(opts, w.model)["sweep"] = {"candidates": table, "chosen": table[best]["config"]}
    return chosen


def run_main(opts: Options, load: HttpLoad, workloads: list[Workload], tuned: dict[str, Serve]) -> None:
    """The tuned fleet: toolkit tuned, compiled, minimal handler; the router in front."""
    want = opts.scenarios
    if opts.split_cores:
        tuned = fleets.one_worker_per_cpu_of_half(tuned)
    variants = []
    for w in workloads:
        variants.append(Variant(w.model, "1.0", tuned[w.model]))
        if "compiled" in want:
            variants.append(Variant(w.model, "3.0", tuned[w.model], (("compile", True), ("amp_cpu", "bf16"))))
        if "minimal" in want:
            variants.append(Variant(w.model, "1.0", opts.minimal, minimal=True))
    opts.log(f"main server: {len(variants)} versions (tuned: "
             + ", ".join(f"{m} {s.label()}" for m, s in tuned.items()) + ")")
    fleet, store, manifest = fleets.build(variants, opts.work / "main")
    with fleets.serving(fleet, store, opts.work / "main" / "ts") as (ts, ready_s):
        opts.log(f"  ready in {ready_s:.1f} s")
        router = None
        stack = contextlib.ExitStack()
        try:
            if {"router-rest", "router-grpc"} & want:
                router = RouterProcessRunner(manifest, ts.config, opts.work / "main", opts.router_processes)
            base, key = ts.ep.url("inference"), ts.keys.inference
            auth = ts.keys.header("inference")
            grpc_direct = f"127.0.0.1:{ts.ep.grpc_inference}"
            front = fleets.frontend_pid(ts)
            meter = CpuMeter({
                "workers": lambda: fleets.worker_pids(ts),
                "frontend": lambda: [front] if front else [],
                "router": lambda: router.pids() if router else [],
            })
            if opts.split_cores:
                layout = stack.enter_context(split_cores(fleets.worker_pids(ts), [p for p in (front, *(router.pids() if router else [])) if p]))
                opts.results["split_cores"] = layout
                opts.log(f"  workers on CPUs {layout['workers']}; frontend, router and load on CPUs {layout['serving']}")
            for w in workloads:
                direct_url = base + f"/predictions/{w.model}"
                targets: dict[str, Target] = {"toolkit-tuned": http_target(load, direct_url, w, auth)}
                pairs: dict[str, tuple[PairTarget, PairTarget]] = {}
                if router and "router-rest" in want:
                    routed_url = router.url + f"/predictions/{w.model}"
                    targets["router-rest"] = http_target(load, routed_url, w, auth)
                    pairs["REST"] = (http_pair(load, [direct_url, routed_url], w, auth),
                                     http_pair(load, [direct_url, direct_url], w, auth))
                # Each gRPC path twice: the project's client and h2load (h2load_target.py), unless
                # h2load is missing (run_all said so; the report says so again).
                outside = not h2load.missing_reason()
                if "grpc-direct" in want:
                    targets["grpc-direct"] = grpc_target(grpc_direct, w, key)
                    if outside:
                        targets["grpc-direct-h2load"] = H2loadTarget(grpc_direct, w, key, ts.ep.url("metrics"),
                                                                     "torchserve", opts.work / "h2load")
                if router and "router-grpc" in want:
                    targets["router-grpc"] = grpc_target(router.grpc, w, key)
                    if outside:
                        targets["router-grpc-h2load"] = H2loadTarget(router.grpc, w, key, router.url, "router",
                                                                     opts.work / "h2load")
                    pairs["gRPC"] = (grpc_pair([grpc_direct, router.grpc], w, key),
                                     grpc_pair([grpc_direct, grpc_direct], w, key))
                if "compiled" in want:
                    targets["compiled"] = http_target(load, base + f"/predictions/{w.model}/3.0", w, auth)
                if "minimal" in want:
                    targets["minimal"] = http_target(load, base + f"/predictions/minimal-{w.model}", w, auth)
                metered = {name: meter.wrap(name, t) if name in METERED else t for name, t in targets.items()}
                # Every target at every concurrency first: a compiled model meets its new shapes
                # (and compiles them) here, not during another target's timed window.
                compiling = "compiled" in want
                for clients in opts.concurrency if compiling else ():
                    warm(targets, opts, clients)
                for i, clients in enumerate(opts.concurrency):
                    measured = measure(metered, opts, clients, on_warm=meter.reset, settle=compiling or i > 0)
                    for name, figures in measured.items():
                        if name in METERED:
                            figures["cpu_ms_per_request"] = meter.per_request(name)
                        variant = {"compiled": "3.0"}.get(name, "1.0")
                        model = f"minimal-{w.model}" if name == "minimal" else w.model
                        serve = opts.minimal if name == "minimal" else tuned[w.model]
                        config = {**serve.as_dict(), **({"compile": True, "amp_cpu": "bf16"} if name == "compiled" else {})}
                        _record(opts, w.model, name, clients, figures, config=config,
                                peak_rss_mb=fleets.worker_rss(ts, model, variant))
                    if not opts.overhead:
                        continue
                    for proto, row in measure_overhead(targets, measured, opts, clients).items():
                        model_entry(opts, w.model).setdefault("overhead", {}).setdefault(proto, {})[str(clients)] = row
                    for proto, row in measure_side_by_side(pairs, measured, opts, clients).items():
                        model_entry(opts, w.model).setdefault("side_by_side", {}).setdefault(proto, {})[str(clients)] = row
                if "compiled" in want:
                    dev = fleets.answers_deviation(base + f"/predictions/{w.model}/1.0",
                                                   base + f"/predictions/{w.model}/3.0", w.items,
                                                   {**auth, "Content-Type": w.content_type})
                    model_entry(opts, w.model)["scenarios"]["compiled"]["max_abs_deviation"] = dev
                    opts.log(f"  {w.model}: compile + bf16 answers within {dev:.2e} of fp32 eager")
            opts.results["frontend_rss_mb"] = fleets.frontend_rss(ts)
            if router:
                opts.results["router_rss_mb"] = round(peak_rss_mb(router.proc.pid), 1)
        finally:
            stack.close()
            if router:
                router.stop()
