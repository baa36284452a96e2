"""The router's own cost per request, with no model behind it: ``python -m benchmarks.speed.hop``.

Behind a real TorchServe, what the router adds is a fraction of a millisecond inside
answers of several milliseconds that vary by more than that from run to run. Here a
stand-in (standin.py) answers in place of TorchServe, at once or in batches as a GPU
does, and direct and routed runs alternate, so the router's added latency, its share of
direct's throughput and its CPU per request stand out. The stand-in and the load run on
one half of the CPUs, the router on the other. Written as benchmarks/results/router-hop.json
and docs/benchmarks-router-hop.md (with --out DIR, under DIR).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from benchmarks.harness import RouterProcessRunner
from benchmarks.speed.cli import metadata
from benchmarks.speed.cpu import pin, process_cpu
from benchmarks.speed.loadgen import HttpLoad, Sample, run_grpc
from benchmarks.speed.plots import plot_hop
from benchmarks.speed.scenarios import summarize
from benchmarks.speed.workload import ROOT
from tsfleet.manifest import load_fleet
from tsfleet.build.properties import Endpoints
from tsfleet.router.processes import process_count

BODY = b'{"text": "book me a flight to Rome"}'


def body(kb: int) -> bytes:
    """The request body: BODY, or (``kb`` > 0) a JSON body of ``kb`` KiB, image-sized."""
    return BODY if kb <= 0 else b'{"data": "' + b"A" * (kb * 1024 - 12) + b'"}'
HEADERS = {"Content-Type": "application/json"}


def _standin(port: int, batch_ms: float, grpc_port: int, log: Path) -> subprocess.Popen:
    with open(log, "ab") as errors:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "benchmarks.speed.standin", str(port), str(batch_ms),
                                 str(grpc_port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=errors, text=True)
    if proc.stdout is None or proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"the stand-in upstream did not start (see {log})")
    return proc


def _cpu(pids: list[int]) -> float:
    return sum(sum(process_cpu(pid)) for pid in pids)


def measure(args: argparse.Namespace, load: HttpLoad, work: Path, log: Callable[[str], None] = print) -> list[dict]:
    """Every (upstream batch, router processes, protocol, clients) row: direct and routed, interleaved."""
    cpus = sorted(os.sched_getaffinity(0))
    near, far = (set(cpus[:len(cpus) // 2]), set(cpus[len(cpus) // 2:])) if len(cpus) > 1 else (set(cpus),) * 2
    pin(os.getpid(), near)  # this process and the load it starts: beside the stand-in
    model = next(iter(load_fleet(ROOT / "fleet.yaml").models))
    rows = []
    for batch_ms in args.batch_ms:
        ep = Endpoints.on_free_ports()
        config = work / f"config-{batch_ms}.properties"
        config.write_text(f"inference_address=http://127.0.0.1:{ep.inference}\nmanagement_address="
                          f"http://127.0.0.1:{ep.management}\nmetrics_address=http://127.0.0.1:{ep.metrics}\n"
                          f"grpc_inference_port={ep.grpc_inference}\ngrpc_management_port={ep.grpc_management}\n")
        standin = _standin(ep.inference, batch_ms, ep.grpc_inference, work / "standin.log")
        try:
            for processes in args.processes:
                routers = {"routed": RouterProcessRunner(ROOT / "fleet.yaml", config, work, processes)}
                try:
                    if args.before_code is not None:
                        (work / "before").mkdir(exist_ok=True)
                        routers["before"] = RouterProcessRunner(args.before_code / "fleet.yaml", config, work / "before",
                                                                processes, code=args.before_code)
                    pids = {name: router.pids() for name, router in routers.items()}
                    for pid in itertools.chain(*pids.values()):
                        pin(pid, far)
                    for protocol, kb in itertools.product(args.protocols, args.body_kb):
                        urls, run = _targets(protocol, kb, ep, routers, model, load)
                        for clients in args.clients:
                            rows.append({"protocol": protocol, "batch_ms": batch_ms, "processes": processes,
                                         "body_bytes": len(body(kb)), **_row(run, urls, pids, clients, args)})
                            log(f"  {protocol:<4} batch {batch_ms:g} ms, {processes} process(es), "
                                f"body {_size(rows[-1]['body_bytes'])}, " + _line(rows[-1]))
                finally:
                    for router in routers.values():
                        router.stop()
        finally:
            standin.kill()
            standin.wait()
    return rows


def _targets(protocol: str, kb: int, ep: Endpoints, routers: dict[str, RouterProcessRunner], model: str,
             load: HttpLoad) -> tuple[dict[str, str], Callable[[str, int, float], Sample]]:
    """(direct and each router's address, how to load one) for ``protocol`` with a ``kb`` body."""
    data = body(kb)
    if protocol == "REST":
        return ({"direct": f"http://127.0.0.1:{ep.inference}/predictions/{model}",
                 **{name: f"{r.url}/predictions/{model}" for name, r in routers.items()}},
                lambda url, c, secs: load(url, [data], HEADERS, c, secs))
    return ({"direct": f"127.0.0.1:{ep.grpc_inference}", **{name: r.grpc for name, r in routers.items()}},
            lambda target, c, secs: run_grpc(target, model, [data], "-", c, secs))


def _size(n: int) -> str:
    return f"{n} B" if n < 1024 else f"{n / 1024:g} KiB"


def _row(run: Callable[[str, int, float], Sample], urls: dict[str, str], pids: dict[str, list[int]], clients: int,
         args: argparse.Namespace) -> dict:
    """Direct and each router (``routed``; ``before``: another checkout's), in rotating order."""
    for url in urls.values():
        run(url, clients, args.warmup)
    names = list(urls)
    samples: dict[str, list] = {name: [] for name in names}
    cpu = {name: 0.0 for name in pids}
    requests = {name: 0 for name in pids}
    for n in range(args.runs):
        for name in names[n % len(names):] + names[:n % len(names)]:
            before = _cpu(pids[name]) if name in pids else 0.0
            sample = run(urls[name], clients, args.seconds)
            samples[name].append(sample)
            if name in pids:
                cpu[name] += _cpu(pids[name]) - before
                requests[name] += sample.requests
    stats = {name: summarize(s) for name, s in samples.items()}
    direct = stats["direct"]
    row = {"clients": clients}
    for name, figures in stats.items():
        row[name] = figures
        if name == "direct":
            continue
        prefix = "" if name == "routed" else f"{name}_"
        row[prefix + "ratio"] = round(figures["rps"] / direct["rps"], 3) if direct["rps"] else None
        row[prefix + "added_p50_ms"] = round(figures["p50_ms"] - direct["p50_ms"], 3)
        row[prefix + "router_cpu_us_per_request"] = round(cpu[name] / requests[name] * 1e6, 1) if requests[name] else None
    return row


def _line(row: dict) -> str:
    direct, routed = row["direct"], row["routed"]
    line = (f"c={row['clients']:<3} direct {direct['rps']:8.0f} req/s p50 {direct['p50_ms']:6.2f} | routed "
            f"{routed['rps']:8.0f} req/s p50 {routed['p50_ms']:6.2f} | ratio {row['ratio']} | router "
            f"{row['router_cpu_us_per_request']} us/request")
    if "before" in row:
        line += (f" | before {row['before']['rps']:8.0f} req/s ratio {row['before_ratio']} "
                 f"{row['before_router_cpu_us_per_request']} us/request")
    return line


def before_table(rows: list[dict], before: str) -> list[str]:
    """This router beside the one at ``before``, measured in the same runs."""
    lines = [f"| protocol | upstream | clients | direct req/s | ratio now | ratio at {before} | added p50 ms now | "
             f"at {before} | router CPU us/request now | at {before} | CPU now / before |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        upstream = "answers at once" if not r["batch_ms"] else f"batches every {r['batch_ms']:g} ms"
        now, then = r["router_cpu_us_per_request"], r["before_router_cpu_us_per_request"]
        change = f"{now / then:.2f}" if now and then else "n/a"
        lines.append(f"| {r['protocol']} | {upstream} | {r['clients']} | {r['direct']['rps']:.0f} | {r['ratio']:.2f} | "
                     f"{r['before_ratio']:.2f} | {r['added_p50_ms']:+.2f} | {r['before_added_p50_ms']:+.2f} | {now} | "
                     f"{then} | {change} |")
    return lines


def table(rows: list[dict]) -> list[str]:
    lines = ["| protocol | upstream | router processes | request body | clients | direct req/s | routed req/s | ratio "
             "| direct p50 ms | routed p50 ms | added p50 ms | router CPU us/request | failed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        upstream = "answers at once" if not r["batch_ms"] else f"batches every {r['batch_ms']:g} ms"
        size = _size(r.get("body_bytes", len(BODY)))
        lines.append(f"| {r['protocol']} | {upstream} | {r['processes']} | {size} | {r['clients']} | {r['direct']['rps']:.0f} | "
                     f"{r['routed']['rps']:.0f} | {r['ratio']:.2f} | {r['direct']['p50_ms']:.2f} | "
                     f"{r['routed']['p50_ms']:.2f} | {r['added_p50_ms']:+.2f} | {r['router_cpu_us_per_request']} | "
                     f"{r['direct']['failed'] + r['routed']['failed']} |")
    return lines


def write(doc: dict, out: Path, stem: str = "router-hop") -> list[Path]:
    """The JSON, the table and the plot; ``stem`` names them (another for a run of large bodies)."""
    data = out / "benchmarks" / "results" / f"{stem}.json"
    text = out / "docs" / f"benchmarks-{stem}.md"
    plot = plot_hop(doc["rows"], out / "docs" / f"bench_{stem.replace('-', '_')}.png")
    data.parent.mkdir(parents=True, exist_ok=True)
    text.parent.mkdir(parents=True, exist_ok=True)
    data.write_text(json.dumps(doc, indent=1) + "\n")
    meta = doc["meta"]
    text.write_text("\n".join([
        "# The router's own cost per request", "",
        f"Written by `{meta['command']}` on {meta['date']}: {meta['cpu_count']} CPUs ({meta['cpu_model']}), "
        f"Python {meta['python']}, REST load from **{meta['load_tool']}**, gRPC load from an asyncio client "
        f"(4 connections per target), {meta['runs']} run(s) of "
        f"{meta['seconds']:g} s per figure (medians), direct and routed runs alternating. Data: "
        f"`benchmarks/results/{data.name}`.", "",
        "A stand-in (`benchmarks/speed/standin.py`) answers in place of TorchServe, REST with TorchServe's "
        "headers and gRPC over the router's own HTTP/2, with no model work: at once, or in batches as TorchServe on a GPU does (every request waiting when a "
        "batch window ends is answered at once). The stand-in and the load run on one half of the CPUs, the "
        "router on the other. Behind batches, each answer waits for the router to pass on the ones before it, "
        "so the router's CPU per request, times the batch, is what it adds.", "",
        *table(doc["rows"]), "", f"![router hop]({plot.name})", "",
        *([f"## Beside the router at {meta['before']}", "",
           f"The router of commit {meta['before']} ran beside this one, on the same stand-in, in the same "
           "rotation of runs (direct, now, before), so the box's drift falls on both alike.", "",
           *before_table(doc["rows"], meta["before"]), ""] if meta.get("before") else [])]))
    return [data, text, plot]


def _checkout(rev: str, where: Path) -> Path:
    """The tree of ``rev`` (its files only, from git), to run its router from."""
    where.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def _command(parser: argparse.ArgumentParser, args: argparse.Namespace, processes: list[str]) -> str:
    """The command line that makes this run again; options at their defaults are left out."""
    given = {"processes": processes, "clients": args.clients, "batch_ms": args.batch_ms, "body_kb": args.body_kb}
    if args.smoke:  # it sets clients and batches itself
        del given["clients"], given["batch_ms"]
    words = ["python -m benchmarks.speed.hop"] + (["--smoke"] if args.smoke else [])
    for name, values in given.items():
        if values != parser.get_default(name):
            words += [f"--{name.replace('_', '-')}"] + [v if isinstance(v, str) else f"{v:g}" for v in values]
    return " ".join(words + (["--before", args.before] if args.before else []))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed.hop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--batch-ms", type=float, nargs="+", default=[0, 4],
                        help="the stand-in's batch window; 0 answers at once")
    parser.add_argument("--processes", nargs="+", default=["auto"], help="router process counts, or auto")
    parser.add_argument("--protocols", nargs="+", choices=("REST", "gRPC"), default=["REST", "gRPC"])
    parser.add_argument("--body-kb", type=int, nargs="+", default=[0],
                        help="request body sizes in KiB; 0 is a one-line JSON body. Any other size writes "
                             "router-hop-bodies.json and its table and plot instead")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--smoke", action="store_true", help="a few seconds in all, for CI")
    parser.add_argument("--before", metavar="REV", help="also run the router of this git revision, in the same runs")
    parser.add_argument("--out", type=Path, default=ROOT, help="write docs/ and benchmarks/results/ under here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.clients, args.batch_ms, args.runs, args.seconds, args.warmup = [4], [0, 2], 1, 0.5, 0.3
    asked = args.processes
    try:
        args.processes = sorted({process_count(n) for n in args.processes})
    except ValueError as exc:
        parser.error(f"--processes: {exc}")
    load = HttpLoad(args.load)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tsfleet-bench-hop-") as tmp:
        args.before_code = _checkout(args.before, Path(tmp) / "before-code") if args.before else None
        rows = measure(args, load, Path(tmp), log=lambda line: print(line, flush=True))
    command = _command(parser, args, asked)
    doc = {"meta": {**metadata("hop"), "load_tool": load.tool, "runs": args.runs,
                    "seconds": args.seconds, "duration_s": round(time.monotonic() - started, 1), "command": command,
                    **({"before": args.before} if args.before else {})},
           "rows": rows}
    for path in write(doc, args.out, "router-hop" if args.body_kb == [0] else "router-hop-bodies"):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
