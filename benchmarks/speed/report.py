"""The results document (JSON), the bars checked against it, and docs/benchmarks.md."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.speed.h2load_report import comparison_table, what_h2load_is
from benchmarks.speed.loadgen import GRPC_CONNECTIONS
from benchmarks.speed.plots import plot_model
from benchmarks.speed.workload import requests_text

ORDER = ("peer", "toolkit-b1", "toolkit-tuned", "router-rest", "grpc-direct", "grpc-direct-h2load", "router-grpc",
         "router-grpc-h2load", "compiled", "minimal")


def _fig(entry: dict, scenario: str, clients: str) -> dict | None:
    return entry.get("scenarios", {}).get(scenario, {}).get("by_concurrency", {}).get(clients)


def bars(doc: dict) -> list[dict]:
    """Each floor of the issue that this run's figures can decide, with value and verdict."""
    out: list[dict] = []

    def add(bar: str, model: str, clients: str, value: float, target: str, met: bool) -> None:
        out.append({"bar": bar, "model": model, "concurrency": clients, "value": round(value, 3),
                    "target": target, "met": bool(met)})

    for model, entry in doc.get("models", {}).items():
        for clients in sorted({c for r in entry.get("scenarios", {}).values() for c in r["by_concurrency"]}, key=int):
            tuned = _fig(entry, "toolkit-tuned", clients)
            if not tuned:
                continue
            peer = _fig(entry, "peer", clients)
            if peer and peer["rps"]:
                add("tuned >= 3x the FastAPI peer", model, clients, tuned["rps"] / peer["rps"], ">= 3.0",
                    tuned["rps"] >= 3 * peer["rps"])
                add("tuned p99 no worse than the peer's (ms)", model, clients, tuned["p99_ms"],
                    f"<= {peer['p99_ms']:.1f}", tuned["p99_ms"] <= peer["p99_ms"])
            if entry.get("limit"):
                ratio = tuned["rps"] / entry["limit"]["ceiling"]
                add("tuned >= 90% of the limit", model, clients, ratio, ">= 0.90", ratio >= 0.9)
            minimal = _fig(entry, "minimal", clients)
            if minimal and minimal["rps"]:
                ratio = tuned["rps"] / minimal["rps"]
                add("tuned >= 1.10x the minimal handler", model, clients, ratio, ">= 1.10", ratio >= 1.1)
                compiled = _fig(entry, "compiled", clients)
                if compiled:
                    ratio = compiled["rps"] / minimal["rps"]
                    add("toolkit + compile + bf16 >= 1.10x the minimal handler", model, clients, ratio, ">= 1.10",
                        ratio >= 1.1)
            for routed, direct, proto in (("router-rest", "toolkit-tuned", "REST"), ("router-grpc", "grpc-direct", "gRPC")):
                r, d = _fig(entry, routed, clients), _fig(entry, direct, clients)
                if r and d and d["rps"]:
                    add(f"router {proto} throughput within 10% of direct", model, clients, r["rps"] / d["rps"],
                        ">= 0.90", r["rps"] >= 0.9 * d["rps"])
                    ov = entry.get("overhead", {}).get(proto, {}).get(clients)
                    if ov:
                        add(f"router {proto} adds under 1 ms at p50, half load (ms)", model, clients,
                            ov["added_p50_ms"], "< 1.0", ov["added_p50_ms"] < 1.0)
                    added = r["p50_ms"] - d["p50_ms"]
                    add(f"router {proto} adds under 1 ms at p50, saturated (ms)", model, clients, added, "< 1.0",
                        added < 1.0)
                    both = entry.get("side_by_side", {}).get(proto, {}).get(clients)
                    for load, words in (("paced", "half load"), ("saturated", "saturated")):
                        if both:
                            added = both[load]["added_p50_ms"]
                            add(f"router {proto} adds under 1 ms at p50, side by side, {words} (ms)", model, clients,
                                added, "< 1.0", added < 1.0)
    cold = doc.get("cold_start")
    if cold:
        add("fleet ready after start (s)", "all", "-", cold["with_workflow_s"], "< 60", cold["with_workflow_s"] < 60)
        for model, m in cold["models"].items():
            add("first request after ready vs warm p99 (ms)", model, "1", m["first_ms"], f"<= {m['p99_ms']:.1f}",
                m["first_ms"] <= m["p99_ms"])
    return out


def _cfg(config: dict | None) -> str:
    if not config:
        return ""
    if "batch_size" not in config:
        return ", ".join(f"{k} {v}" for k, v in config.items())
    text = (f"b{config['batch_size']}/{config['max_batch_delay_ms']}ms, "
            f"{config['workers']}w x {config['torch_threads']}t")
    return text + (", compile, bf16" if config.get("compile") else "")


def scenario_table(entry: dict) -> list[str]:
    clients = sorted({c for r in entry.get("scenarios", {}).values() for c in r["by_concurrency"]}, key=int)
    head = "| scenario | config | " + " | ".join(f"c={c} req/s | p50 ms | p99 ms | failed" for c in clients) + " |"
    lines = [head, "|" + "---|" * (2 + 4 * len(clients))]
    for name in ORDER:
        row = entry.get("scenarios", {}).get(name)
        if not row:
            continue
        cells = []
        for c in clients:
            f = row["by_concurrency"].get(c)
            cells += ([f"{f['rps']:.0f} ±{f['rps_spread']:.0f}", f"{f['p50_ms']:.1f} ±{f['p50_spread']:.1f}",
                       f"{f['p99_ms']:.1f} ±{f['p99_spread']:.1f}", str(f["failed"])] if f else ["", "", "", ""])
        lines.append(f"| {row['label']} | {_cfg(row.get('config'))} | " + " | ".join(cells) + " |")
    return lines


def limit_table(limit: dict, unit: str) -> list[str]:
    sizes = list(limit["by_batch"])
    lines = ["| batch | " + " | ".join(sizes) + " |", "|---|" + "---|" * len(sizes),
             f"| {unit}/s ({limit['processes']} processes x 1 thread) | "
             + " | ".join(f"{b['rate']:.0f} ±{b['spread']:.0f}" for b in limit["by_batch"].values()) + " |"]
    return lines


def cpu_table(entry: dict) -> list[str]:
    """CPU ms per request by process group, for the metered scenarios."""
    rows = []
    for name in ORDER:
        row = entry.get("scenarios", {}).get(name)
        for c, f in sorted((row or {}).get("by_concurrency", {}).items(), key=lambda kv: int(kv[0])):
            cpu = f.get("cpu_ms_per_request")
            if cpu:
                rows.append(f"| {row['label']} | {c} | {cpu['workers_user_ms'] + cpu['workers_sys_ms']:.2f} | "
                            f"{cpu['frontend_user_ms'] + cpu['frontend_sys_ms']:.2f} | "
                            f"{cpu['router_user_ms']:.2f} / {cpu['router_sys_ms']:.2f} | {cpu['other_ms']:.2f} | "
                            f"{cpu['machine_ms']:.2f} |")
    if not rows:
        return []
    return ["Where the CPU goes, in CPU milliseconds per request during the timed windows (from /proc): the "
            "model workers, TorchServe's Java frontend, the router (user = Python / system = kernel socket work) "
            "and the rest of the machine (mostly the load generator):", "",
            "| scenario | clients | workers | frontend | router user / sys | rest | whole machine |",
            "|---|---|---|---|---|---|---|", *rows, ""]


def overhead_table(entry: dict) -> list[str]:
    """Direct vs through the router under the same paced load."""
    rows = []
    for proto, by_c in entry.get("overhead", {}).items():
        for c, o in sorted(by_c.items(), key=lambda kv: int(kv[0])):
            d, r = o["direct"], o["router"]
            rows.append(f"| {proto} | {c} | {o['share']:.0%} of {o['capacity_rps']:.0f} (think {o['think_ms']:.0f} ms) | "
                        f"{d['rps']:.0f} | {d['p50_ms']:.2f} / {d['p99_ms']:.1f} | {r['rps']:.0f} | "
                        f"{r['p50_ms']:.2f} / {r['p99_ms']:.1f} | {o['added_p50_ms']:+.2f} | {o['added_p99_ms']:+.1f} |")
    if not rows:
        return []
    return ["The router's added latency below saturation: direct and through the router under the same paced "
            "load (each client waits a random, exponential think time between requests, so that together they "
            "offer about half of direct's closed-loop capacity), interleaved; added = median of the paired "
            "differences:", "",
            "| protocol | clients | offered req/s | direct req/s | direct p50 / p99 ms | router req/s | "
            "router p50 / p99 ms | added p50 ms | added p99 ms |",
            "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def side_by_side_table(entry: dict) -> list[str]:
    """Direct and routed clients loading the server in the same window, and the A/A control."""
    rows = []
    for proto, by_c in entry.get("side_by_side", {}).items():
        for c, o in sorted(by_c.items(), key=lambda kv: int(kv[0])):
            for load, words in (("paced", f"half (think {o['think_ms']:.0f} ms)"), ("saturated", "saturated")):
                q = o[load]
                rows.append(f"| {proto} | {c} | {words} | {q['a']['rps']:.0f} | {q['a']['p50_ms']:.2f} / "
                            f"{q['a']['p99_ms']:.1f} | {q['b']['rps']:.0f} | {q['b']['p50_ms']:.2f} / "
                            f"{q['b']['p99_ms']:.1f} | {q['added_p50_ms']:+.2f} | "
                            + (f"{o['aa']['added_p50_ms']:+.2f} |" if load == "paced" else "|"))
    if not rows:
        return []
    return ["The same, side by side: half the clients direct and half through the router, in the same "
            "windows (wrk: one process per side; gRPC: each client's calls alternate), so both sides meet the "
            "same batches, the same busy cores and the same slow seconds, and the difference is the router's "
            "own path. A/A: the same paced run with both halves direct, the difference this method reads "
            "with no router at all (its noise). Added = median over runs of router p50 minus direct p50:", "",
            "| protocol | clients | load | direct req/s | direct p50 / p99 ms | router req/s | "
            "router p50 / p99 ms | added p50 ms | A/A p50 ms |",
            "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def memory_table(doc: dict) -> list[str]:
    lines = ["| model | scenario | peak RSS per process (MiB) |", "|---|---|---|"]
    for model, entry in doc.get("models", {}).items():
        if entry.get("limit"):
            lines.append(f"| {model} | limit (in process) | {', '.join(map(str, entry['limit']['peak_rss_mb']))} |")
        for name in ORDER:
            row = entry.get("scenarios", {}).get(name)
            if row and row.get("peak_rss_mb") and name not in (
                    "router-rest", "router-grpc", "grpc-direct", "grpc-direct-h2load", "router-grpc-h2load"):
                lines.append(f"| {model} | {row['label']} | {', '.join(map(str, row['peak_rss_mb']))} |")
    for key, label in (("frontend_rss_mb", "TorchServe frontend (JVM), main server"), ("router_rss_mb", "router")):
        if doc.get(key):
            lines.append(f"| all | {label} | {doc[key]} |")
    return lines


def _where_time_goes(model: str, entry: dict, cores: int) -> list[str]:
    """The CPU table read out: why tuned is below the limit, and what the router costs."""
    limit = entry.get("limit")
    out = []
    for c in sorted({c for r in entry.get("scenarios", {}).values() for c in r["by_concurrency"]}, key=int):
        tuned, routed = (_fig(entry, s, c) for s in ("toolkit-tuned", "router-rest"))
        cpu = (tuned or {}).get("cpu_ms_per_request")
        if not cpu:
            continue
        text = (f"- **{model}**, {c} clients, where the time goes: the machine spent {cpu['machine_ms']:.2f} ms of CPU "
                f"per request, {cpu['workers_user_ms'] + cpu['workers_sys_ms']:.2f} ms of it in the model workers, "
                f"{cpu['frontend_user_ms'] + cpu['frontend_sys_ms']:.2f} ms in TorchServe's frontend and "
                f"{cpu['other_ms']:.2f} ms in the rest (the load generator)")
        if limit:
            best = cores * 1000 / limit["ceiling"]
            batch = entry["scenarios"]["toolkit-tuned"].get("config", {}).get("batch_size", 0)
            smaller = (f"its batches are at most {batch}, and " if batch and batch < limit["ceiling_batch"] else "")
            text += (f"; the limit's own work is {best:.2f} ms per {entry['unit'][:-1]} at its best batch "
                     f"({limit['ceiling_batch']}), which the server cannot match: {smaller}every request also "
                     "crosses HTTP, the JVM and the worker's socket protocol (TorchServe's Python side decodes "
                     "and encodes each one)")
        rcpu = (routed or {}).get("cpu_ms_per_request")
        if rcpu:
            text += (f". Through the router: {rcpu['router_user_ms']:.2f} ms of Python and "
                     f"{rcpu['router_sys_ms']:.2f} ms of kernel time in the router per request, "
                     f"{rcpu['machine_ms']:.2f} ms for the machine in all: on {cores} busy cores that CPU is taken "
                     "from the workers")
        out.append(text + ".")
    return out


def discussion(doc: dict, checks: list[dict]) -> list[str]:
    meta = doc["meta"]
    met = [c for c in checks if c["met"]]
    lines = [f"{len(met)} of {len(checks)} checks met in this run." if checks else "No bar could be checked in this run.", ""]
    for model, entry in doc.get("models", {}).items():
        limit = entry.get("limit")
        for c in sorted({c for r in entry.get("scenarios", {}).values() for c in r["by_concurrency"]}, key=int):
            tuned, peer, minimal = (_fig(entry, s, c) for s in ("toolkit-tuned", "peer", "minimal"))
            if not tuned:
                continue
            parts = [f"at {c} clients tuned TorchServe served {tuned['rps']:.0f} {entry['unit']}/s"]
            if peer:
                parts.append(f"{tuned['rps'] / max(peer['rps'], 1e-9):.1f}x the FastAPI peer")
            if limit:
                parts.append(f"{tuned['rps'] / limit['ceiling']:.0%} of the in-process limit")
            if minimal:
                parts.append(f"{tuned['rps'] / max(minimal['rps'], 1e-9):.2f}x the minimal handler")
            lines.append(f"- **{model}**: " + ", ".join(parts) + ".")
        lines += _where_time_goes(model, entry, meta["cpu_count"])
        comp = entry.get("scenarios", {}).get("compiled")
        if comp and "max_abs_deviation" in comp:
            lines.append(f"- **{model}**: torch.compile + bf16 autocast answers differ from fp32 eager by at most "
                         f"{comp['max_abs_deviation']:.2e} (largest absolute difference over the request set).")
    if meta.get("cpu_native_bf16") is False and any(e.get("scenarios", {}).get("compiled")
                                                     for e in doc.get("models", {}).values()):
        lines.append("- **This CPU has no native bf16** (neither AVX512-BF16 nor AMX in /proc/cpuinfo): bf16 "
                     "autocast is emulated here, so the compile + bf16 rows measure the emulation, not compile. "
                     "On a CPU with it (an Intel Xeon, 2026-11-26) the same rows led the minimal handler by "
                     "1.4-1.6x; set `amp_cpu: \"off\"` on a CPU without it.")
    lines += [
        "",
        f"- The machine has {meta['cpu_count']} CPU cores. The load generator ({meta['load_tool']}), TorchServe's "
        "Java frontend, the router and the model workers all share them, so every server row pays for its "
        "client and the in-process limit pays for none: the limit is a ceiling no server reaches in full here. "
        "Compare rows of one run only; a rerun on a quieter or bigger machine moves all rows.",
        "- The router is a Python process: on this box its CPU comes out of the workers' share, which is what "
        "its closed-loop rows measure. At saturation every client of a closed loop waits for a core, so the "
        "router's added p50 there is c / throughput through the router minus c / throughput direct: any "
        "throughput it costs, multiplied by the queue. Below saturation (the half-load table) the added "
        "latency is the router's own work and its extra loopback hop. Two separate windows of a batching "
        "server differ by a millisecond or more on their own, so the side-by-side table loads direct and "
        "routed clients in the same windows; its A/A column (both halves direct) is the resolution of that "
        "method.",
        "- The FastAPI peer here is the tutorial's default, as a baseline: one uvicorn process, default torch "
        "threads, a `def` endpoint over the model (FastAPI runs it in a thread pool, so concurrent requests "
        "run the model in parallel threads, each wanting every core), one forward pass per request. It is "
        "not the best peer: tsfleet beside FastAPI with uvicorn workers, LitServe, mosec and Ray Serve, each "
        "swept like tsfleet, is docs/benchmarks-peers.md (`make bench-peers`).",
        "- Where a bar is not met the table above says by how much; nothing in the suite is tuned to one run.",
    ]
    if not meta.get("gpu"):
        lines.append("- **No GPU was available for this run**: every figure is on CPU, and there is no GPU table "
                     "(fp32 vs AMP vs AMP + compile, GPU memory before and after cleanup). Run `make bench` on "
                     "a CUDA machine to measure them; no GPU figure here is estimated.")
    return lines


def markdown(doc: dict, checks: list[dict], plots: dict[str, str], data: str = "latest.json") -> str:
    meta = doc["meta"]
    s = meta["settings"]
    out = [
        "# Speed benchmarks", "",
        f"Written by `{meta['command']}`{' (`make bench`)' if meta['command'] == 'python -m benchmarks.speed' else ''} on {meta['date']}: {meta['cpu_count']} CPU cores "
        f"({meta['cpu_model']}), {'GPU ' + meta['gpu_name'] if meta['gpu'] else 'no GPU'}, Python {meta['python']}, "
        f"torch {meta['torch']}, TorchServe {meta['torchserve']}, FastAPI {meta['fastapi']}, uvicorn {meta['uvicorn']}. "
        f"HTTP load from **{meta['load_tool']}**{' (one thread, a Lua script cycling the POST bodies)' if meta['load_tool'] == 'wrk' else ' (an asyncio aiohttp closed loop: wrk is not installed)'}; "
        f"gRPC load from an asyncio client over the router's generated stubs, {GRPC_CONNECTIONS} connections per target. "
        + (f"The router ran as {meta['router_processes']} processes. " if meta.get("router_processes", 1) > 1 else "")
        + f"Each figure is the median of {s['runs']} run(s) of {s['seconds']:.0f} s after a warm-up that lasts until "
        f"two {s['warmup']:.0f} s windows in a row agree within 15% (a compiled model must have compiled every shape), "
        f"± the spread (max - min); the whole run took {meta['duration_s'] / 60:.1f} minutes. "
        f"Every figure is in `benchmarks/results/{data}`.", "",
        *what_h2load_is(doc),
        *([f"**Split cores**: the model workers (one per CPU) ran on CPU(s) {doc['split_cores']['workers']} only, and TorchServe's "
           f"frontend, the router and the load generators on CPU(s) {doc['split_cores']['serving']}, so that the router's "
           "CPU is not taken from the workers: what a machine with cores to spare for the serving path shows. The "
           "workers have half the machine, so compare the rows of this run with each other, not with "
           "[benchmarks.md](benchmarks.md).", ""] if doc.get("split_cores") else []),
        requests_text(meta.get("image_px", 64)),
        "", "## How to reproduce", "",
        "```bash", "make bench                               # builds the archives first; about 25 minutes on 2 cores",
        ".venv/bin/python -m benchmarks.speed --quick   # one run per figure, smaller sweep",
        ".venv/bin/python -m benchmarks.speed --smoke --out /tmp/bench   # what CI runs",
        ".venv/bin/python -m benchmarks.speed --split-cores   # router rows, workers on half the cores",
        ".venv/bin/python -m benchmarks.speed --split-cores --router-processes 1 2 4   # the router's gain per process",
        ".venv/bin/python -m benchmarks.speed --quick --image-px 640   # camera-sized JPEGs (its own report)",
        "```", "",
        "Install `wrk` (`apt-get install wrk`) for the HTTP load; without it the suite falls back to a Python "
        "generator and says so above. Install h2load (`make bench-tools`, or `apt-get install nghttp2-client`) "
        "for the gRPC rows from an outside tool; without it they are missing and the report says so above.", "",
        "## Checks against the bars", "",
        "| check | model | clients | value | target | met |", "|---|---|---|---|---|---|",
    ]
    out += [f"| {c['bar']} | {c['model']} | {c['concurrency']} | {c['value']:.2f} | {c['target']} | "
            f"{'yes' if c['met'] else '**no**'} |" for c in checks]
    for model, entry in doc.get("models", {}).items():
        out += ["", f"## {model}", ""]
        if entry.get("limit"):
            out += ["The limit: the model's own work in process (decode, tokenize or resize, forward, pooling or "
                    f"softmax), {entry['limit']['processes']} single-thread processes side by side:", ""]
            out += limit_table(entry["limit"], entry["unit"]) + [""]
        if entry.get("scenarios"):
            out += (scenario_table(entry) + [""] + comparison_table(entry) + cpu_table(entry) + overhead_table(entry)
                    + side_by_side_table(entry))
        sweep = entry.get("sweep")
        if sweep:
            out += ["The sweep that chose the tuned configuration (one run per point; score = geometric mean "
                    "of req/s over the concurrency levels):", "",
                    "| configuration | " + " | ".join(f"c={c} req/s / p99 ms" for c in sweep["candidates"][0]["by_concurrency"])
                    + " | score |", "|---|" + "---|" * (len(sweep["candidates"][0]["by_concurrency"]) + 1)]
            for cand in sweep["candidates"]:
                out.append(f"| {cand['label']} | " + " | ".join(f"{f['rps']:.0f} / {f['p99_ms']:.0f}"
                                                              for f in cand["by_concurrency"].values())
                           + f" | {cand['score_rps']:.0f} |")
            out.append("")
        if model in plots:
            out += [f"![{model}]({plots[model]})", ""]
    cold = doc.get("cold_start")
    if cold:
        out += ["## Cold start", "",
                f"The repo's whole fleet ({cold['fleet_workers']} workers, from the archives `make build` left in "
                f"`model_store/`) was ready {cold['ready_s']:.1f} s after `torchserve --start`, "
                f"{cold['with_workflow_s']:.1f} s with the workflow registered and the serving path warmed up (a few "
                "sample requests per version, as `make up` sends them before it says the fleet is ready).", "",
                "| model | first request ms | warm p50 ms | warm p99 ms |", "|---|---|---|---|"]
        out += [f"| {m} | {f['first_ms']:.1f} | {f['p50_ms']:.1f} | {f['p99_ms']:.1f} |" for m, f in cold["models"].items()]
        out.append("")
    for phase, error in doc.get("errors", {}).items():
        out += [f"**{phase} failed in this run**: {error}", ""]
    out += ["## Memory", ""] + memory_table(doc) + ["", "## Discussion", ""] + discussion(doc, checks)
    return "\n".join(out) + "\n"


def write_all(doc: dict, out_dir: Path, variant: str | None = None) -> list[Path]:
    """latest.json, the plots and benchmarks.md under ``out_dir``; a ``variant`` run (e.g.
    split-cores) writes {variant}.json, bench-{variant}_*.png and benchmarks-{variant}.md."""
    docs, results = out_dir / "docs", out_dir / "benchmarks" / "results"
    docs.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    doc["bars"] = bars(doc)
    plots, written = {}, []
    for model, entry in doc.get("models", {}).items():
        if entry.get("scenarios"):
            path = plot_model(model, entry, docs / (f"bench-{variant}_{model}.png" if variant else f"bench_{model}.png"))
            plots[model] = path.name
            written.append(path)
    data = results / (f"{variant}.json" if variant else "latest.json")
    text = docs / (f"benchmarks-{variant}.md" if variant else "benchmarks.md")
    data.write_text(json.dumps(doc, indent=2) + "\n")
    text.write_text(markdown(doc, doc["bars"], plots, data.name))
    return [data, text, *written]
