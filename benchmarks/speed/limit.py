"""Scenario 1, the limit: the model's own throughput in process, no server.

The machine's ceiling on CPU is as many single-thread processes as cores, each running
batches (one process with all threads loses to that), so the limit runs that layout, starts
every timed window of all processes together, and sums their rates.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import time
from typing import Any

from benchmarks.speed.workload import Pipeline, workload


def peak_rss_mb(pid: int | str = "self") -> float:
    """Peak resident set (VmHWM) of a process in MiB; 0 when /proc does not say."""
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _worker(model: str, batch_sizes: list[int], runs: int, seconds: float, warmup: float, image_px: int,
            barrier: Any, out: Any) -> None:
    import torch

    torch.set_num_threads(1)
    requests = workload(model, image_px)
    pipeline = Pipeline(requests)
    bodies = requests.items
    at = 0

    def batch(size: int) -> list[bytes]:
        nonlocal at
        picked = [bodies[(at + i) % len(bodies)] for i in range(size)]
        at = (at + size) % len(bodies)
        return picked

    for size in batch_sizes:
        end = time.perf_counter() + warmup
        while time.perf_counter() < end:
            pipeline(batch(size))
        for run in range(runs):
            barrier.wait()
            done, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                pipeline(batch(size))
                done += size
            out.put((size, run, done / (time.perf_counter() - start)))
    out.put(("rss", os.getpid(), peak_rss_mb()))


def run_limit(model: str, batch_sizes: list[int], runs: int, seconds: float, warmup: float = 1.0,
              processes: int | None = None, image_px: int = 64) -> dict:
    """Items/s at each batch size: ``processes`` (default: cores) single-thread processes."""
    processes = processes or os.cpu_count() or 1
    ctx = mp.get_context("spawn")  # a fresh interpreter per process: no forked torch state
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(model, batch_sizes, runs, seconds, warmup, image_px, barrier, out))
             for _ in range(processes)]
    for p in procs:
        p.start()
    rates: dict[tuple[int, int], float] = {}
    rss: list[float] = []
    expected = processes * (len(batch_sizes) * runs + 1)
    deadline = time.monotonic() + 120 + len(batch_sizes) * runs * (seconds + warmup) * 3
    try:
        for _ in range(expected):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError("the limit's processes did not report in time")
            kind, a, b = out.get(timeout=remaining)
            if kind == "rss":
                rss.append(round(b, 1))
            else:
                rates[(kind, a)] = rates.get((kind, a), 0.0) + b
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join()
    by_batch = {}
    for size in batch_sizes:
        values = [rates[(size, r)] for r in range(runs)]
        by_batch[str(size)] = {"rate": round(statistics.median(values), 1),
                               "spread": round(max(values) - min(values), 1),
                               "runs": [round(v, 1) for v in values]}
    best = max(by_batch, key=lambda k: by_batch[k]["rate"])
    return {"processes": processes, "threads_per_process": 1, "by_batch": by_batch,
            "ceiling": by_batch[best]["rate"], "ceiling_batch": int(best), "peak_rss_mb": rss}
