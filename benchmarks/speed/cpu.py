"""Where the CPU goes: CPU time per request of each process group during a scenario's
timed windows (from /proc), so a missed bar on a small machine comes with its profile:
the model workers, TorchServe's Java frontend, the router (user = Python, system = the
kernel's socket work), and the rest of the machine (mostly the load generator)."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from benchmarks.speed.loadgen import Sample

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of one process so far; zeros once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def machine_busy() -> float:
    """CPU seconds the whole machine has spent not idle so far."""
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / TICK


def cpus_busy(cpus: set[int]) -> float:
    """CPU seconds ``cpus`` have spent not idle so far."""
    total = 0
    with open("/proc/stat") as fh:
        for line in fh:
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                ticks = [int(v) for v in values[:8]]
                total += sum(ticks) - ticks[3] - ticks[4]
    return total / TICK


@dataclass
class BusyMeter:
    """How busy a set of CPUs was during the calls of wrapped targets (1.0: every one, all the time)."""

    cpus: set[int]
    totals: dict[str, list[float]] = field(default_factory=dict)  # name: [busy CPU seconds, wall seconds]

    def wrap(self, name: str, target: Callable[..., Sample]) -> Callable[..., Sample]:
        def run(clients: int, seconds: float, think_s: float = 0.0) -> Sample:
            busy, wall = cpus_busy(self.cpus), time.monotonic()
            sample = target(clients, seconds, think_s)
            acc = self.totals.setdefault(name, [0.0, 0.0])
            acc[0] += cpus_busy(self.cpus) - busy
            acc[1] += time.monotonic() - wall
            return sample
        return run

    def share(self, name: str) -> float | None:
        busy, wall = self.totals.get(name, (0.0, 0.0))
        return round(busy / (wall * len(self.cpus)), 3) if wall and self.cpus else None

    def reset(self) -> None:
        self.totals.clear()


@dataclass
class CpuMeter:
    """Accumulates CPU per process group over the calls of wrapped targets."""

    groups: dict[str, Callable[[], list[int]]]
    totals: dict[str, dict[str, float]] = field(default_factory=dict)

    def _read(self) -> dict[str, float]:
        out = {"machine": machine_busy()}
        for group, pids in self.groups.items():
            user = system = 0.0
            for pid in pids():
                u, s = process_cpu(pid)
                user, system = user + u, system + s
            out[f"{group}_user"], out[f"{group}_sys"] = user, system
        return out

    def wrap(self, name: str, target: Callable[..., Sample]) -> Callable[..., Sample]:
        def run(clients: int, seconds: float, think_s: float = 0.0) -> Sample:
            before = self._read()
            sample = target(clients, seconds, think_s)
            after = self._read()
            acc = self.totals.setdefault(name, {"requests": 0.0})
            acc["requests"] += sample.requests
            for key, value in after.items():
                acc[key] = acc.get(key, 0.0) + value - before[key]
            return sample
        return run

    def per_request(self, name: str) -> dict[str, float]:
        """CPU milliseconds per request, per group (user and system) and for the rest."""
        acc = self.totals.get(name)
        if not acc or not acc["requests"]:
            return {}
        n = acc["requests"]
        out = {k + "_ms": round(v / n * 1000, 3) for k, v in acc.items() if k not in ("requests", "machine")}
        known = sum(v for k, v in acc.items() if k not in ("requests", "machine"))
        out["other_ms"] = round(max(acc["machine"] - known, 0.0) / n * 1000, 3)
        out["machine_ms"] = round(acc["machine"] / n * 1000, 3)
        return out

    def reset(self) -> None:
        self.totals.clear()


def pin(pid: int, cpus: set[int]) -> None:
    """Confine every thread of ``pid`` to ``cpus``; threads they start later inherit it."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), cpus)


@contextlib.contextmanager
def split_cores(workers: list[int], serving: list[int]) -> Iterator[dict[str, list[int]]]:
    """The model workers on the first half of the CPUs, the serving path (``serving`` pids:
    the frontend, the router) and this thread (the load generators it runs and starts) on
    the other half: what a box with cores to spare for the serving path looks like."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        raise RuntimeError("--split-cores needs at least 2 CPUs")
    layout = {"workers": cpus[:len(cpus) // 2], "serving": cpus[len(cpus) // 2:]}
    for pid in workers:
        pin(pid, set(layout["workers"]))
    for pid in serving:
        pin(pid, set(layout["serving"]))
    os.sched_setaffinity(0, set(layout["serving"]))
    try:
        yield layout
    finally:
        os.sched_setaffinity(0, set(cpus))
