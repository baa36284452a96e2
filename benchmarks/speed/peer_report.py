"""docs/benchmarks-peers.md, its plots and benchmarks/results/peers.json from one
``python -m benchmarks.speed --peers`` run: tsfleet beside the best configuration of each peer."""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from benchmarks.speed.workload import requests_text

PEERS = ("fastapi-default", "fastapi", "litserve", "mosec", "ray")
OURS = ("shipped", "shipped-router", "toolkit-tuned", "router-rest", "minimal")
ORDER = OURS + PEERS
NAMES = {"shipped": "tsfleet as shipped (`make up`)", "shipped-router": "tsfleet as shipped, through the router",
         "toolkit-tuned": "tsfleet tuned", "router-rest": "tsfleet tuned, through the router",
         "minimal": "minimal hand-written handler (TorchServe)", "fastapi-default": "FastAPI, tutorial default",
         "fastapi": "FastAPI + uvicorn workers", "litserve": "LitServe", "mosec": "mosec", "ray": "Ray Serve"}
# Who counts as "the best peer": a server a user would pick instead of tsfleet.
RIVALS = ("fastapi", "litserve", "mosec", "ray")


def versions() -> dict[str, str]:
    out = {}
    for dist in ("litserve", "mosec", "ray", "fastapi", "uvicorn", "torchserve", "sentence-transformers"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "absent"
    return out


def fig(entry: dict, name: str, clients: int | str) -> dict | None:
    row = entry.get("scenarios", {}).get(name, {}).get("by_concurrency", {}).get(str(clients))
    return row if row and row.get("rps") else None


def best_peer(entry: dict, clients: int | str) -> tuple[str, dict] | None:
    """The rival with the most requests per second at ``clients``."""
    rows = [(k, fig(entry, k, clients)) for k in RIVALS]
    rows = [(k, r) for k, r in rows if r]
    return max(rows, key=lambda kr: kr[1]["rps"]) if rows else None


def checks(doc: dict) -> list[dict]:
    """The issue's bars, each with its value and whether it is met."""
    out = []

    def add(what: str, model: str, clients: str, value: float, target: str, met: bool) -> None:
        out.append({"check": what, "model": model, "clients": int(clients), "value": round(value, 2),
                    "target": target, "met": bool(met)})

    for model, entry in doc["models"].items():
        limit = (entry.get("limit") or {}).get("ceiling")
        for clients in doc["meta"]["settings"]["concurrency"]:
            if clients < 16:
                continue
            c = str(clients)
            shipped, tuned, routed = (fig(entry, k, c) for k in ("shipped", "toolkit-tuned", "router-rest"))
            shipped_routed, minimal = fig(entry, "shipped-router", c), fig(entry, "minimal", c)
            best = best_peer(entry, c)
            if shipped and best:
                add(f"as shipped >= 1.3x the best peer ({best[0]})", model, c, shipped["rps"] / best[1]["rps"],
                    ">= 1.30", shipped["rps"] >= 1.3 * best[1]["rps"])
                add("as shipped p99 no worse than the best peer's (ms)", model, c, shipped["p99_ms"],
                    f"<= {best[1]['p99_ms']:.1f}", shipped["p99_ms"] <= best[1]["p99_ms"])
            # The fleet as shipped at fp32 (compiled, say: the same answers) is matched precision too.
            shipped_cfg = (entry.get("scenarios", {}).get("shipped") or {}).get("config") or {}
            fp32_shipped = shipped if shipped_cfg.get("precision") == "fp32" else None
            for peer, ratio in (("mosec", 1.1), ("litserve", 1.5)):
                other = fig(entry, peer, c)
                for label, mine in (("tuned fp32", tuned), ("as shipped, fp32" + (", compiled" if shipped_cfg.get(
                        "compile") else ""), fp32_shipped)):
                    if mine and other:
                        add(f"{label} >= {ratio}x {peer}", model, c, mine["rps"] / other["rps"], f">= {ratio:.2f}",
                            mine["rps"] >= ratio * other["rps"])
            if tuned and minimal:
                add("toolkit handler >= 1.1x the minimal handler", model, c, tuned["rps"] / minimal["rps"], ">= 1.10",
                    tuned["rps"] >= 1.1 * minimal["rps"])
            if fp32_shipped and minimal and shipped_cfg.get("compile"):
                add("toolkit handler as shipped, fp32, compiled >= 1.1x the minimal handler", model, c,
                    fp32_shipped["rps"] / minimal["rps"], ">= 1.10", fp32_shipped["rps"] >= 1.1 * minimal["rps"])
            if tuned and limit:
                add("tuned >= 85% of the in-process limit", model, c, tuned["rps"] / limit, ">= 0.85",
                    tuned["rps"] >= 0.85 * limit)
            for label, direct, via in (("tuned", tuned, routed), ("shipped", shipped, shipped_routed)):
                if direct and via:
                    add(f"{label}: through the router within 5% of direct", model, c, via["rps"] / direct["rps"],
                        ">= 0.95", via["rps"] >= 0.95 * direct["rps"])
    return out


def headroom(doc: dict) -> list[str]:
    """How far ahead of the best peer any server on this machine could be at fp32: the
    in-process limit (the model alone, no server) over the best peer's figure. Where it is
    under a bar's ratio, no server setting reaches that bar here; only less work per request
    (reduced precision that keeps the answers, a CPU that runs it natively) could."""
    rows = []
    for model, entry in doc["models"].items():
        limit = (entry.get("limit") or {}).get("ceiling")
        for clients in doc["meta"]["settings"]["concurrency"]:
            best = best_peer(entry, clients) if clients >= 16 else None
            if limit and best:
                rows.append(f"| {model} | {clients} | {limit:.1f} | {NAMES[best[0]]} {best[1]['rps']:.1f} | "
                            f"{limit / best[1]['rps']:.2f} |")
    if not rows:
        return []
    return ["## The most any server could lead by here", "",
            "The in-process limit is the model alone at its best batch, one single-thread process per core, "
            "computed as the fleet's handlers compute it (MiniLM's texts packed end to end: no work on padding, "
            "which is a quarter of a batch of these sentences; the peers run sentence-transformers, padded, as its "
            "docs do): no server on this machine serves more at fp32. Over the best peer's figure it is the "
            "largest lead any server could have at fp32.", "",
            "| model | clients | in-process limit req/s | best peer req/s | limit / best peer |",
            "|---|---:|---:|---|---:|", *rows, ""]


def _cpu(row: dict) -> str:
    cpu = row.get("cpu_ms_per_request") or {}
    parts = [f"{k[:-3].replace('_user', ' user').replace('_sys', ' sys')} {v:.2f}"
             for k, v in cpu.items() if k.endswith("_ms") and k not in ("machine_ms", "other_ms") and v >= 0.01]
    return "; ".join(parts) + (f" (machine {cpu['machine_ms']:.2f})" if "machine_ms" in cpu else "")


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    v = meta.get("peer_versions", {})
    lines = [
        "# tsfleet beside the servers users pick",
        "",
        f"Written by `{meta['command']}` on {meta['date']}: {meta['cpu_count']} CPU cores ({meta['cpu_model']}), "
        f"Python {meta['python']}, torch {meta['torch']}, TorchServe {v.get('torchserve')}, LitServe {v.get('litserve')}, "
        f"mosec {v.get('mosec')}, Ray {v.get('ray')}, FastAPI {v.get('fastapi')}, uvicorn {v.get('uvicorn')}, "
        f"sentence-transformers {v.get('sentence-transformers')}. HTTP load from **{meta['load_tool']}**, closed "
        f"loop; each figure is the median of {meta['settings']['runs']} run(s) of {meta['settings']['seconds']:.0f} s "
        f"after a warm-up{_one_run_levels(meta['settings'])}; the whole run took {meta['duration_s'] / 60:.1f} minutes, each system alone on the "
        "machine in turn (adjacent windows, not interleaved: a drift of the machine lands on whoever runs then).",
        "",
        requests_text(meta.get("image_px", 64)),
        "",
        "Every system serves the same model code (`benchmarks/speed/peers/models.py` for the peers, the fleet's "
        "handlers for tsfleet) and gets the same request bodies; before any load, each one's answer to every "
        "request of the set is compared with the in-process fp32 reference (the deviation column), and under "
        "load every 200 is checked to be the model's answer (384 floats; a label and its top 3), or it counts as "
        "failed.",
        "",
        "## How each system is set up",
        "",
        "| system | as its docs recommend | swept over |",
        "|---|---|---|",
        "| tsfleet tuned | TorchServe batching (`batch_size`, `max_batch_delay_ms`), workers per version, "
        "torch threads per worker (fleet.yaml) | the configurations below |",
        "| tsfleet as shipped | the repo's fleet.yaml as it is, every model and the workflow loaded, as `make up` "
        "serves it | nothing: what a user gets |",
        "| FastAPI | `uvicorn --workers N`, an `async def` endpoint; the tutorial's `def` endpoint in one process "
        "as its own row | workers x torch threads |",
        "| LitServe | `LitAPI(max_batch_size, batch_timeout)`, `workers_per_device`, `fast_queue=True` | "
        "the same configurations as tsfleet |",
        "| mosec | `append_worker(num, max_batch_size, max_wait_time)`, compact JSON answers | the same |",
        "| Ray Serve | `@serve.batch(max_batch_size, batch_wait_timeout_s)`, `num_replicas`, one CPU per torch "
        "thread, no dashboard | the same |",
        "",
    ]
    found = checks(doc)
    if found:
        lines += ["## Checks against the bars", "", "| check | model | clients | value | target | met |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {c['check']} | {c['model']} | {c['clients']} | {c['value']:.2f} | {c['target']} | "
                  f"{'yes' if c['met'] else '**no**'} |" for c in found]
        lines.append("")
    lines += headroom(doc)
    for model, entry in doc["models"].items():
        limit = entry.get("limit") or {}
        lines += [f"## {model}", ""]
        if limit:
            lines += [f"In-process limit (no server, one single-thread process per core, best batch "
                      f"{limit.get('ceiling_batch')}): "
                      f"**{limit['ceiling']:.1f} {entry.get('unit', 'requests')}/s**.", ""]
        for clients in meta["settings"]["concurrency"]:
            c = str(clients)
            best = best_peer(entry, c)
            lines += [f"### {clients} clients", "",
                      "| system | configuration | req/s | ± | p50 ms | p99 ms | failed | x best peer | deviation | "
                      "CPU ms per request |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
            for name in ORDER:
                row, scen = fig(entry, name, c), entry.get("scenarios", {}).get(name, {})
                if not row:
                    continue
                ratio = f"{row['rps'] / best[1]['rps']:.2f}" if best else ""
                config = config_label(scen.get("config") or {})
                dev = scen.get("max_abs_deviation")
                lines.append(f"| {NAMES[name]} | {config} | {row['rps']:.1f} | {row['rps_spread']:.1f} | "
                             f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['failed']} | {ratio} | "
                             f"{'' if dev is None else f'{dev:.1e}'} | {_cpu(row)} |")
            lines.append("")
        for kind, error in (entry.get("peer_errors") or {}).items():
            lines += [f"**{NAMES.get(kind, kind)} did not run:** `{error.splitlines()[0][:300]}`", ""]
        lines += _sweeps(entry) + _stages(entry, meta["settings"]["concurrency"][-1])
    lines += ["## Plots", ""]
    for model in doc["models"]:
        lines += [f"![{model}: throughput by clients; latency by throughput](bench_peers_{model}.png)", ""]
    lines += ["## How to reproduce", "", "```bash",
              "make bench-peers            # installs the peers (benchmarks/requirements-peers.txt) and runs this",
              ".venv/bin/python -m benchmarks.speed --peers --quick   # one run per figure, two configurations each",
              ".venv/bin/python -m benchmarks.speed --peers mosec litserve   # some of the peers", "```", ""]
    return "\n".join(lines)


def _one_run_levels(settings: dict) -> str:
    """Where the run measured one window only: the levels outside the sweep's (Options.runs_at)."""
    swept = settings.get("sweep_concurrency")
    others = [c for c in settings["concurrency"] if swept and c not in swept]
    return (f" (at {', '.join(map(str, others))} clients, a level no bar reads, one run)"
            if others and settings["runs"] > 1 else "")


def config_label(config: dict) -> str:
    """A configuration as the tables name it: batching (where there is any), then processes x threads."""
    if not config:
        return ""
    threads = config.get("torch_threads", "auto")
    threads = f"{threads} thread" if isinstance(threads, int) else f"{threads} threads"
    batch = (f"batch {config.get('batch_size')} / {config.get('max_batch_delay_ms')} ms, "
             if config.get("batch_size", 1) > 1 else "")
    amp = config.get("amp_cpu", "off")
    resolved = f" ({config['precision']} here)" if amp == "auto" and config.get("precision") else ""
    precision = ", ".join(p for p in (f"amp_cpu {amp}{resolved}" if amp != "off" else "",
                                      "compiled" if config.get("compile") else "") if p)
    return f"{batch}{config.get('workers')} x {threads}" + (f", {precision}" if precision else "")


def _stages(entry: dict, clients: int) -> list[str]:
    """Where the time goes: each profiled system's CPU per request by process group and stage."""
    rows = []
    for name in ORDER:
        scen = entry.get("scenarios", {}).get(name, {})
        cpu = (scen.get("by_concurrency", {}).get(str(clients)) or {}).get("cpu_ms_per_request") or {}
        if not scen.get("stages"):
            continue
        if "frontend_user_ms" in cpu:
            jvm = cpu["frontend_user_ms"] + cpu.get("frontend_sys_ms", 0.0)
            rows.append(f"| {NAMES[name]} | TorchServe frontend (Java) | {jvm:.2f} | not sampled (JVM) |")
        for group, prof in scen["stages"].items():
            if not prof["samples"] and prof["cpu_ms"] < 0.01:
                continue  # a role this system does not have apart (FastAPI's front is its worker)
            split = ", ".join(f"{stage} {ms:.2f}" for stage, ms in prof["ms_per_request"].items() if ms >= 0.005)
            rows.append(f"| {NAMES[name]} | {group} | {prof['cpu_ms']:.2f} | "
                        f"{split or 'no samples'} ({prof['samples']} samples) |")
    if not rows:
        return []
    return [f"### Where the time goes ({clients} clients)", "",
            "CPU milliseconds per request of each process group in the timed windows, split by the stage "
            "py-spy found each group's Python processes in during one more window of the same load "
            "(benchmarks/speed/stages.py; native time inside a call is charged to its Python caller).", "",
            "| system | processes | CPU ms per request | by stage (ms per request) |", "|---|---|---:|---|",
            *rows, ""]


def _sweeps(entry: dict) -> list[str]:
    lines = ["### The sweeps", "", "| system | configuration | score (req/s, geometric mean) |", "|---|---|---:|"]
    rows = [("toolkit-tuned", s) for s in (entry.get("sweep") or {}).get("candidates", [])]
    for name in PEERS:
        rows += [(name, s) for s in entry.get("scenarios", {}).get(name, {}).get("sweep") or []]
    if not rows:
        return []
    for name, s in rows:
        score = f"{s['score_rps']:.1f}" if "score_rps" in s else f"failed: {s.get('error', '')[:80]}"
        lines.append(f"| {NAMES[name]} | {s.get('label', '')} | {score} |")
    return lines + [""]


def plot(doc: dict, model: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entry = doc["models"][model]
    fig_, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    levels: set[int] = set()
    for name in ORDER:
        scen = entry.get("scenarios", {}).get(name)
        if not scen:
            continue
        pts = sorted((int(c), r) for c, r in scen["by_concurrency"].items() if r.get("rps"))
        if not pts:
            continue
        levels.update(c for c, _ in pts)
        style = "-" if name in OURS else "--"  # solid: tsfleet on TorchServe; dashed: the peers
        xs, rps = [c for c, _ in pts], [r["rps"] for _, r in pts]
        (line,) = left.plot(xs, rps, style, marker="o", label=NAMES[name])
        right.plot(rps, [r["p50_ms"] for _, r in pts], style, marker="o", color=line.get_color())
        right.plot(rps, [r["p99_ms"] for _, r in pts], ":", marker="x", color=line.get_color(), alpha=0.6)
    limit = (entry.get("limit") or {}).get("ceiling")
    if limit:
        left.axhline(limit, color="grey", linestyle=":", label="in-process limit")
    left.set(xscale="log", xlabel="clients (closed loop)", ylabel="requests/s", title=f"{model}: throughput")
    left.set_xticks(sorted(levels), [str(c) for c in sorted(levels)])
    left.minorticks_off()
    right.set(yscale="log", xlabel="requests/s", ylabel="latency, ms (o and solid/dashed: p50; x and dotted: p99)",
              title=f"{model}: latency by throughput (one point per client level)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig_.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig_.tight_layout(rect=(0, 0.14, 1, 1))
    fig_.savefig(path, dpi=110)
    plt.close(fig_)


def write(doc: dict, out: Path) -> list[Path]:
    """The report, one plot per model and the JSON, under ``out``."""
    docs, results = out / "docs", out / "benchmarks" / "results"
    docs.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    doc["checks"] = checks(doc)
    written = [docs / "benchmarks-peers.md", results / "peers.json"]
    written[0].write_text(markdown(doc))
    written[1].write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    for model in doc["models"]:
        path = docs / f"bench_peers_{model}.png"
        plot(doc, model, path)
        written.append(path)
    return written


