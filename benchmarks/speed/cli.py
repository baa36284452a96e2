"""``python -m benchmarks.speed [--quick | --smoke] [--out DIR]``: run the suite, write
DIR/docs/benchmarks.md, DIR/docs/bench_*.png and DIR/benchmarks/results/latest.json
(DIR defaults to the repo, so ``make bench`` refreshes the committed figures)."""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.speed import peer_report, processes, report
from benchmarks.speed.fleets import Serve
from benchmarks.speed.peers import KINDS
from benchmarks.speed.processes import run_processes
from benchmarks.speed.run import run_all
from benchmarks.speed.scenarios import ALL, Options
from benchmarks.speed.workload import ROOT
from tsfleet.router.processes import process_count

SWEEP_FULL = {
    "text-embedder": [Serve(8, 5, 2, 1), Serve(16, 10, 2, 1), Serve(4, 2, 2, 1), Serve(16, 5, 1, 2)],
    "image-classifier": [Serve(8, 5, 2, 1), Serve(16, 5, 2, 1), Serve(32, 10, 2, 1), Serve(16, 5, 1, 2)],
}
DEFAULT_MODELS = ["text-embedder", "image-classifier"]
SPLIT_SCENARIOS = ("toolkit-tuned", "router-rest", "grpc-direct", "router-grpc")
SWEEP_QUICK = {m: c[:2] for m, c in SWEEP_FULL.items()}
SWEEP_SMOKE = {m: [Serve(4, 5, 1, 1)] for m in SWEEP_FULL}

# --peers: tsfleet beside the servers users pick (peer_runs.py, peer_report.py).
PEER_SCENARIOS = {"limit", "peers", "toolkit-tuned", "router-rest", "minimal", "shipped"}
PEER_MODES = {
    # About 28 minutes on 2 cores (34 before the sweep warmed in 1 s windows and the 4-client level
    # got one run). The sweep scores each configuration at 16 and 64 clients:
    # scored at 64 alone (31 minutes with 2 windows per figure) it picked batches of 16-32 that
    # served half as much at 16 clients (benchmarks/results/peers-sweep-at-64.json).
    "full": dict(concurrency=[4, 16, 64], sweep_concurrency=[16, 64], runs=3, seconds=3.0, warmup=2.0,
                 sweep_warmup=1.0, limit_batches=[1, 8, 16, 32], limit_seconds=2.0, sweep=SWEEP_FULL),
    "quick": dict(concurrency=[16, 64], sweep_concurrency=[64], runs=1, seconds=3.0, warmup=1.0,
                  limit_batches=[8, 16], limit_seconds=2.0, sweep=SWEEP_QUICK),
    "smoke": dict(concurrency=[4], sweep_concurrency=[4], runs=1, seconds=2.0, warmup=0.5, limit_batches=[8],
                  limit_seconds=1.0, sweep=SWEEP_SMOKE),
}

MODES = {
    "full": dict(concurrency=[16, 64], runs=3, seconds=3.0, warmup=2.0, limit_batches=[1, 4, 8, 16, 32],
                 limit_seconds=2.0, sweep=SWEEP_FULL, scenarios=set(ALL)),
    "quick": dict(concurrency=[16, 64], runs=1, seconds=3.0, warmup=1.0, limit_batches=[1, 8, 16, 32],
                  limit_seconds=2.0, sweep=SWEEP_QUICK, scenarios=set(ALL)),
    "smoke": dict(concurrency=[4], runs=1, seconds=2.0, warmup=0.5, limit_batches=[1, 8], limit_seconds=1.0,
                  sweep=SWEEP_SMOKE, scenarios={"limit", "toolkit-tuned", "router-rest"}),
}


def metadata(mode: str) -> dict:
    """The machine and versions the figures belong to."""
    import torch

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "absent"

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mode": mode, "cpu_count": os.cpu_count(), "cpu_model": cpu, "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "torchserve": version("torchserve"),
        "fastapi": version("fastapi"), "uvicorn": version("uvicorn"),
        "sentence_transformers": version("sentence-transformers"),
        "gpu": torch.cuda.is_available(),
        "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_native_bf16": native_bf16(),
    }


def native_bf16() -> bool | None:
    """Whether the CPU computes bf16 itself (AVX512-BF16 or AMX); None where it cannot be read.
    Without it, bf16 autocast on CPU is emulated and the compile + bf16 rows fall far behind
    fp32 (the same code led fp32 by 1.4-1.6x on a Xeon with it, trailed 4-7x on an EPYC
    without)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main(argv: list[str] | None = None) -> None:
    """Parse options, run every scenario, write the report."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="one run per figure, smaller sweep (~6 min)")
    group.add_argument("--smoke", action="store_true", help="a tiny run of a few scenarios, for CI")
    parser.add_argument("--out", type=Path, default=ROOT, help="write docs/ and benchmarks/results/ under here")
    parser.add_argument("--load", choices=("auto", "wrk", "python"), default=None,
                        help="HTTP load generator (default: wrk when on PATH; python in --smoke)")
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--scenarios", nargs="+", choices=ALL, help="a subset of the scenarios")
    parser.add_argument("--runs", type=int, help="timed runs per figure")
    parser.add_argument("--seconds", type=float, help="length of each timed run")
    parser.add_argument("--concurrency", type=int, nargs="+", help="concurrent clients")
    parser.add_argument("--no-sweep", action="store_true",
                        help="serve the first sweep configuration (the usual winner) without sweeping")
    parser.add_argument("--split-cores", action="store_true",
                        help="the model workers (one per CPU) on half the CPUs, TorchServe's frontend, the router "
                             "and the load on the other half; the router rows only, no sweep; written as "
                             "docs/benchmarks-split-cores.md")
    parser.add_argument("--router-processes", nargs="+", default=["auto"],
                        help="processes of the router, or auto (route --processes; the default, as `tsfleet up` "
                             "runs it); several counts (e.g. 1 2 4) run only the direct and routed rows for each, "
                             "written as docs/benchmarks-router-processes.md")
    parser.add_argument("--image-px", type=int, default=64,
                        help="side of the image requests: 64 (the model's own size, PNGs of ~0.3 KiB) or larger, "
                             "noisy JPEGs as a camera sends (640: ~165 KiB); a run with another size is written "
                             "as its own variant, e.g. docs/benchmarks-images-640px.md")
    parser.add_argument("--peers", nargs="*", choices=KINDS, metavar="PEER",
                        help="the peer comparison instead of the router suite: tsfleet (as shipped and tuned, "
                             "direct and routed, and the minimal handler) beside each peer (default: all of "
                             f"{', '.join(KINDS)}), every one swept over the same configurations; written as "
                             "docs/benchmarks-peers.md")
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary archives and logs")
    args = parser.parse_args(argv)
    if not 64 <= args.image_px <= 4096:
        parser.error("--image-px: from 64 (the model's own size) to 4096 (the handler's limit)")
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    peers = args.peers is not None
    cfg = dict(PEER_MODES[mode], scenarios=set(PEER_SCENARIOS), overhead=False,
               peer_kinds=tuple(args.peers or KINDS)) if peers else dict(MODES[mode])
    for key in ("runs", "seconds", "concurrency"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.scenarios or args.split_cores:
        cfg["scenarios"] = set(args.scenarios or SPLIT_SCENARIOS)
    if peers and (args.split_cores or len(args.router_processes) > 1 or args.image_px != 64):
        parser.error("--peers runs alone: no --split-cores, one --router-processes, 64 px images")
    try:
        counts = sorted({process_count(n) for n in args.router_processes})
    except ValueError as exc:
        parser.error(f"--router-processes: {exc}")
    sweep_processes = len(counts) > 1
    if args.no_sweep or args.split_cores or sweep_processes:
        cfg["sweep"] = {m: c[:1] for m, c in cfg["sweep"].items()}
    load = args.load or ("python" if mode == "smoke" else "auto")
    work = Path(tempfile.mkdtemp(prefix="tsfleet-bench-speed-"))
    opts = Options(models=args.models, batch1=Serve(1, 1, 2, 1), minimal=Serve(8, 5, 2, 1), load=load,
                   work=work, mode=mode, log=lambda line: print(line, flush=True), split_cores=args.split_cores,
                   router_processes=counts[0], image_px=args.image_px, **cfg)
    started = time.monotonic()
    try:
        results = run_processes(opts, counts) if sweep_processes else run_all(opts)
    finally:
        if args.keep_work:
            print(f"work files kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    doc = {"meta": {**metadata(mode), "load_tool": results.pop("load_tool"),
                    "duration_s": round(time.monotonic() - started, 1), "router_processes": counts,
                    "settings": {k: cfg[k] for k in ("concurrency", "runs", "seconds", "warmup",
                                                     "limit_batches", "limit_seconds", "sweep_concurrency")
                                 if k in cfg},
                    "command": "python -m benchmarks.speed" + {"full": "", "quick": " --quick",
                                                                "smoke": " --smoke"}[mode]
                    + (" --models " + " ".join(args.models) if args.models != DEFAULT_MODELS else "")
                    + (" --split-cores" if args.split_cores else "")
                    + (" --router-processes " + " ".join(map(str, counts)) if counts != [1] else "")
                    + (f" --image-px {args.image_px}" if args.image_px != 64 else "")
                    + (" --peers" + "".join(f" {k}" for k in args.peers or ()) if peers else ""),
                    "image_px": args.image_px},
           **results}
    images = f"images-{args.image_px}px" if args.image_px != 64 else None
    if peers:
        doc["meta"]["router_processes"] = counts[0]
        doc["meta"]["peer_versions"] = peer_report.versions()
        written = peer_report.write(doc, args.out)
    elif sweep_processes:
        written = processes.write(doc, args.out, images)
    else:
        doc["meta"]["router_processes"] = counts[0]
        variant = "-".join(v for v in ("split-cores" if args.split_cores else None, images) if v)
        written = report.write_all(doc, args.out, variant or None)
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
