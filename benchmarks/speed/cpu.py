"""Where the CPU goes: CPU time per request of each process group during a scenario's
timed windows (from /proc), so a missed bar on a small machine comes with its profile:
the model workers, TorchServe's Java frontend, the router (user = Python, system = the
kernel's socket work), and the rest of the machine (mostly the load generator)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

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
