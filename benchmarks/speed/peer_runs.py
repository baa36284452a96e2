"""The peer comparison's own runs: every peer (peers/) swept over the same configurations as
tsfleet, its best measured like tsfleet's rows; and the fleet as ``make up`` ships it.

Each peer configuration is started alone on the machine, its answers to every request of
the set compared with the in-process reference (``max_abs_deviation``), then loaded at the
sweep's concurrency levels; the best (geometric mean of throughput) is started again and
measured at every level, ``runs`` windows each, with the CPU of its processes by role.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Iterator

import requests

from benchmarks.harness import RouterProcessRunner
from benchmarks.speed import fleets, stages
from benchmarks.speed.cpu import CpuMeter
from benchmarks.speed.fleets import Serve
from benchmarks.speed.limit import peak_rss_mb
from benchmarks.speed.loadgen import HttpLoad
from benchmarks.speed.peer_report import config_label
from benchmarks.speed.peers import LABELS as PEER_LABELS
from benchmarks.speed.peers import PeerServer
from benchmarks.speed.peers.models import PeerConfig
from benchmarks.speed.precision import BF16_MAX_DEVIATION
from benchmarks.speed.scenarios import Options, Target, _geomean, _record, measure, model_entry
from benchmarks.speed.workload import ROOT, Pipeline, Workload, answer_check, deviation
from handlers.config import RuntimeSettings
from handlers.runtime import resolve_amp_cpu
from tsfleet.manifest import load_fleet
from tsfleet.build.properties import Endpoints

# FastAPI has no batching: its sweep is the process and thread layout, as many as the others'.
FASTAPI_LAYOUTS = ((2, 1), (1, 2), (4, 1), (3, 1))
# Answers further than this from the in-process fp32 reference are a different model.
MAX_DEVIATION = 1e-3


def peer_configs(kind: str, w: Workload, sweep: list[Serve]) -> list[PeerConfig]:
    """The configurations of ``kind`` the sweep tries: tsfleet's own list for a batching peer."""
    if kind == "fastapi-default":
        return [PeerConfig(w.model, w.artifacts, 1, 0, 1, 0)]
    if kind == "fastapi":
        return [PeerConfig(w.model, w.artifacts, 1, 0, n, t) for n, t in FASTAPI_LAYOUTS[:len(sweep)]]
    return [PeerConfig(w.model, w.artifacts, s.batch_size, s.delay_ms, s.workers, s.threads) for s in sweep]


def config_dict(cfg: PeerConfig) -> dict:
    return {"batch_size": cfg.batch_size, "max_batch_delay_ms": cfg.delay_ms, "workers": cfg.workers,
            "torch_threads": cfg.threads or "default"}


def check_answers(url: str, w: Workload, reference: list[dict], headers: dict[str, str],
                  bound: float = MAX_DEVIATION) -> float:
    """Every request of the set once; the largest deviation from the reference. A non-200
    or an answer of the wrong shape raises: such a server's speed means nothing."""
    worst = 0.0
    with requests.Session() as session:
        for body, ref in zip(w.bodies, reference):
            resp = session.post(url, data=body, headers={**headers, "Content-Type": w.content_type}, timeout=60)
            if resp.status_code != 200:
                raise RuntimeError(f"{url} answered {resp.status_code}: {resp.text[:200]}")
            worst = max(worst, deviation(resp.json(), ref))
    if worst > bound:
        raise RuntimeError(f"{url} answers differ from the reference by {worst:.2e} (> {bound})")
    return worst


def checked_target(load: HttpLoad, url: str, w: Workload, headers: dict[str, str]) -> Target:
    hdrs, check = {**headers, "Content-Type": w.content_type}, answer_check(w.model)
    return lambda clients, seconds, think_s=0.0: load(url, w.items, hdrs, clients, seconds, think_s, check)


@contextlib.contextmanager
def started(kind: str, cfg: PeerConfig, w: Workload, work: Path) -> Iterator[PeerServer]:
    server = PeerServer(kind, cfg, Endpoints.on_free_ports().inference, work, (w.bodies[0], w.content_type))
    try:
        yield server
    finally:
        server.stop()


def roles(server: PeerServer) -> dict[str, list[int]]:
    """The peer's processes by role: ``front`` where a front can be told apart by name (mosec's
    Rust binary, Ray's HTTP proxy actor), ``rest`` for everything else (the model workers, and
    for FastAPI and LitServe their Python fronts too, which share the workers' name)."""
    import psutil

    out: dict[str, list[int]] = {"front": [], "rest": []}
    for pid in server.pids():
        try:
            proc = psutil.Process(pid)
            name, cmd = proc.name(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        front = name == "mosec" or "ProxyActor" in name or "ProxyActor" in cmd
        out["front" if front else "rest"].append(pid)
    return out


def run_peer_kind(opts: Options, load: HttpLoad, w: Workload, kind: str, reference: list[dict]) -> None:
    """Sweep ``kind``'s configurations, then measure its best at every concurrency level."""
    table, configs = [], peer_configs(kind, w, opts.sweep[w.model])
    swept = configs if len(configs) > 1 else []  # one configuration: nothing to choose
    for cfg in swept:
        try:
            with started(kind, cfg, w, opts.work) as server:
                dev = check_answers(server.url, w, reference, {})
                target = checked_target(load, server.url, w, {})
                by_c = {str(c): measure({"x": target}, opts, c, runs=1, settle=i > 0, sweep=True)["x"]
                        for i, c in enumerate(opts.sweep_concurrency or opts.concurrency)}
        except RuntimeError as exc:
            opts.log(f"  sweep {kind:<15} {config_label(config_dict(cfg)):<36} FAILED: {str(exc).splitlines()[0]}")
            table.append({"config": config_dict(cfg), "label": config_label(config_dict(cfg)), "error": str(exc)[:2000]})
            continue
        score = _geomean([r["rps"] for r in by_c.values()])
        table.append({"config": config_dict(cfg), "label": config_label(config_dict(cfg)), "score_rps": round(score, 1),
                      "max_abs_deviation": dev, "_cfg": cfg,
                      "by_concurrency": {c: {k: r[k] for k in ("rps", "p50_ms", "p99_ms", "failed")}
                                         for c, r in by_c.items()}})
        opts.log(f"  sweep {w.model:<16} {kind:<15} {config_label(config_dict(cfg)):<36} {score:8.1f} req/s (geometric mean)")
    scored = [row for row in table if "score_rps" in row]
    if len(configs) > 1 and not scored:
        model_entry(opts, w.model).setdefault("peer_errors", {})[kind] = table[0]["error"]
        return
    best = max(scored, key=lambda r: r["score_rps"])["_cfg"] if scored else configs[0]
    for row in scored:
        row.pop("_cfg")
    try:
        with started(kind, best, w, opts.work) as server:
            dev = check_answers(server.url, w, reference, {})
            meter = CpuMeter({role: (lambda r=role: roles(server)[r]) for role in ("front", "rest")})
            plain = checked_target(load, server.url, w, {})
            target = meter.wrap(kind, plain)
            for i, clients in enumerate(opts.concurrency):
                figures = measure({kind: target}, opts, clients, on_warm=meter.reset, settle=i > 0)[kind]
                figures["cpu_ms_per_request"] = meter.per_request(kind)
                _record(opts, w.model, kind, clients, figures, config=config_dict(best),
                        max_abs_deviation=dev, sweep=table,
                        peak_rss_mb=[round(peak_rss_mb(p), 1) for p in roles(server)["rest"]])
            top = opts.concurrency[-1]
            model_entry(opts, w.model)["scenarios"][kind]["stages"] = stages.profile(
                roles(server), opts.seconds, lambda: plain(top, opts.seconds), figures["cpu_ms_per_request"])
    except RuntimeError as exc:
        opts.log(f"  {kind}: FAILED: {str(exc).splitlines()[0]}")
        model_entry(opts, w.model).setdefault("peer_errors", {})[kind] = str(exc)[:2000]


def run_tutorial_peer(opts: Options, load: HttpLoad, w: Workload) -> None:
    """The router suite's peer row: FastAPI as its tutorial serves a model, one process."""
    port = Endpoints.on_free_ports().inference
    opts.log(f"peer: FastAPI + uvicorn for {w.model}")
    peer = PeerServer("fastapi-default", PeerConfig(w.model, w.artifacts, 1, 0, 1, 0), port, opts.work,
                      (w.bodies[0], w.content_type))
    try:
        target = checked_target(load, peer.url, w, {})
        for i, clients in enumerate(opts.concurrency):
            figures = measure({"peer": target}, opts, clients, settle=i > 0)["peer"]
            _record(opts, w.model, "peer", clients, figures, config={"uvicorn_workers": 1},
                    peak_rss_mb=[round(sum(peak_rss_mb(p) for p in peer.pids()), 1)])
    finally:
        peer.stop()


def run_peers(opts: Options, load: HttpLoad, workloads: list[Workload], kinds: list[str]) -> None:
    """Every peer in ``kinds`` for every model, one configuration on the machine at a time."""
    for w in workloads:
        reference = Pipeline(w).answers(w.items)
        for kind in kinds:
            opts.log(f"peer: {PEER_LABELS[kind]} for {w.model}")
            started_at = time.monotonic()
            run_peer_kind(opts, load, w, kind, reference)
            opts.log(f"  {kind} took {time.monotonic() - started_at:.0f} s")


def run_shipped(opts: Options, load: HttpLoad, workloads: list[Workload]) -> None:
    """The repo's fleet as ``make up`` serves it (fleet.yaml as it is, every model and the
    workflow, archives from model_store/), direct and through the router."""
    fleet = load_fleet(ROOT / "fleet.yaml")
    opts.log("shipped: the repo's fleet.yaml from model_store/, every model loaded")
    with fleets.serving(fleet, ROOT / "model_store", opts.work / "shipped") as (ts, _):
        ts.register_workflows(fleet)
        ts.warm_up(fleet)
        router = RouterProcessRunner(ROOT / "fleet.yaml", ts.config, opts.work / "shipped", opts.router_processes)
        try:
            auth = ts.keys.header("inference")
            front = fleets.frontend_pid(ts)
            meter = CpuMeter({"workers": lambda: fleets.worker_pids(ts), "frontend": lambda: [front] if front else [],
                              "router": router.pids})
            for w in workloads:
                reference = Pipeline(w).answers(w.items)
                direct = ts.ep.url("inference") + f"/predictions/{w.model}"
                routed = router.url + f"/predictions/{w.model}"
                spec = fleet.models[w.model].versions[fleet.models[w.model].default_version]
                # bf16 here (amp_cpu: bf16, or auto on a CPU with it): held to bf16's stated bound.
                amp = resolve_amp_cpu(RuntimeSettings(amp_cpu=spec.settings.get("amp_cpu", "off"))).amp_cpu
                bound = BF16_MAX_DEVIATION if amp == "bf16" else MAX_DEVIATION
                dev = max(check_answers(u, w, reference, auth, bound) for u in (direct, routed))
                targets = {"shipped": meter.wrap("shipped", checked_target(load, direct, w, auth)),
                           "shipped-router": meter.wrap("shipped-router", checked_target(load, routed, w, auth))}
                config = {"batch_size": spec.serving.batch_size, "max_batch_delay_ms": spec.serving.max_batch_delay_ms,
                          "workers": spec.serving.workers, "torch_threads": spec.settings.get("torch_threads", "auto"),
                          "amp_cpu": spec.settings.get("amp_cpu", "off"), "compile": bool(spec.settings.get("compile")),
                          "precision": "bf16" if amp == "bf16" else "fp32"}
                for i, clients in enumerate(opts.concurrency):
                    for name, figures in measure(targets, opts, clients, on_warm=meter.reset, settle=i > 0).items():
                        figures["cpu_ms_per_request"] = meter.per_request(name)
                        _record(opts, w.model, name, clients, figures, config=config, max_abs_deviation=dev,
                                peak_rss_mb=fleets.worker_rss(ts, w.model, spec.version))
                # The routed path's profile: the workers' stages and the router's, in one window.
                top = opts.concurrency[-1]
                row = model_entry(opts, w.model)["scenarios"]["shipped-router"]
                cpu = row["by_concurrency"][str(top)]["cpu_ms_per_request"]
                routed_load = checked_target(load, routed, w, auth)
                row["stages"] = stages.profile(
                    {"workers": fleets.worker_pids(ts), "router": router.pids()}, opts.seconds,
                    lambda: routed_load(top, opts.seconds), cpu)
        finally:
            router.stop()
