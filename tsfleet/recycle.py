"""Worker recycling: replace a worker past its request, age or memory limit, losing nothing.

TorchServe can neither recycle a worker nor retire a chosen one (scale-down removes the
newest). So a replacement goes: scale up by one and wait until the newcomer is READY
(capacity never drops), ask the old worker to exit at its next idle moment (it finishes
what it accepted; SIGTERM only after a grace period), wait until TorchServe has restarted
its slot with a fresh process, then scale back down, which removes the newcomer. One
replacement at a time per model version; a failed one restores the worker count, is
reported, and that version waits ``cooldown_s`` before the next try.
"""
from __future__ import annotations

import json
import os
import signal
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tsfleet.client import ManagementClient, VersionState
from tsfleet.errors import ApiError, FleetError, Unreachable
from tsfleet.locks import report_dir_of, version_lock
from tsfleet.manifest import Fleet, RecyclePolicy, VersionSpec

EVENTS = "recycle-events.jsonl"


@dataclass(frozen=True)
class Report:
    """What a worker says about itself (handlers/lifecycle.py writes it)."""

    pid: int
    requests: int
    started: float
    rss_mb: float
    cuda_mb: float


@dataclass(frozen=True)
class Event:
    model: str
    version: str
    pid: int
    reason: str
    ok: bool
    detail: str = ""
    at: float = field(default_factory=time.time)


def read_reports(report_dir: Path, model: str, version: str) -> dict[int, Report]:
    """The reports of this version's live workers (a killed worker's file is skipped)."""
    reports = {}
    for path in (report_dir / model / version).glob("*.json"):
        try:
            doc = json.loads(path.read_text())
            if not _alive(int(doc["pid"])):
                continue
            reports[int(doc["pid"])] = Report(int(doc["pid"]), int(doc["requests"]), float(doc["started"]),
                                              float(doc["rss_mb"]), float(doc.get("cuda_mb", 0.0)))
        except (OSError, ValueError, KeyError):
            continue  # being replaced right now
    return reports


def last_events(report_dir: Path) -> dict[tuple[str, str], dict]:
    """The newest recycle event per (model, version)."""
    last: dict[tuple[str, str], dict] = {}
    try:
        lines = (report_dir / EVENTS).read_text().splitlines()
    except OSError:
        return last
    for line in lines:
        try:
            doc = json.loads(line)
            last[(doc["model"], doc["version"])] = doc
        except (ValueError, KeyError):
            continue
    return last


def request_limit(policy: RecyclePolicy, pid: int) -> int:
    """max_requests plus a per-worker share of the jitter, stable for a pid, so workers
    started together do not all restart together."""
    if not policy.max_requests:
        return 0
    return policy.max_requests + zlib.crc32(str(pid).encode()) % (policy.max_requests_jitter + 1)


@dataclass(frozen=True)
class Trend:
    """How fast a worker's counters grow, and how long a replacement takes: a worker is
    replaced when it would cross a limit before its replacement is ready, not after."""

    lead_s: float = 0.0
    rss_mb_per_s: float = 0.0
    requests_per_s: float = 0.0


def over_limit(policy: RecyclePolicy, report: Report, now: float, trend: Trend = Trend()) -> str | None:
    """Why this worker must go now, or None."""
    lead = trend.lead_s
    limit = request_limit(policy, report.pid)
    if limit and report.requests + trend.requests_per_s * lead >= limit:
        return f"max_requests: served {report.requests}, limit {limit}"
    if policy.max_age_s and now - report.started + lead >= policy.max_age_s:
        return f"max_age: {now - report.started:.0f} s, limit {policy.max_age_s} s"
    if policy.max_rss_mb and report.rss_mb + trend.rss_mb_per_s * lead >= policy.max_rss_mb:
        return f"max_rss: {report.rss_mb:.0f} MB, limit {policy.max_rss_mb} MB"
    if policy.max_gpu_memory_mb and report.cuda_mb >= policy.max_gpu_memory_mb:
        return f"max_gpu_memory: {report.cuda_mb:.0f} MB, limit {policy.max_gpu_memory_mb} MB"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


class Recycler:
    """Watches every worker of the fleet's versions that have a policy, and replaces them."""

    def __init__(self, fleet: Fleet, client: ManagementClient, report_dir: Path,
                 progress: Callable[[str], None] = print, grace_s: float = 30, ready_timeout_s: float = 300,
                 cooldown_s: float = 60):
        self.fleet, self.client, self.report_dir, self.progress = fleet, client, report_dir, progress
        self.grace_s, self.ready_timeout_s, self.cooldown_s = grace_s, ready_timeout_s, cooldown_s
        self.events: list[Event] = []
        self._cooldown: dict[tuple[str, str], float] = {}
        self._seen: dict[int, tuple[float, Report]] = {}  # first sighting of each pid
        self._replace_s = 5.0  # learnt from the replacements done so far
        self._deferred: set[tuple[str, str]] = set()  # versions whose change lock apply holds

    def _state(self, spec: VersionSpec) -> VersionState | None:
        return next((v for v in self.client.describe(spec.model) if v.version == spec.version), None)

    def _wait(self, spec: VersionSpec, done: Callable[[VersionState], bool], what: str) -> VersionState:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            state = self._state(spec)
            if state and done(state):
                return state
            time.sleep(0.2)
        raise FleetError(f"{spec.model} {spec.version}: {what} did not happen within {self.ready_timeout_s:.0f} s")

    def tick(self) -> list[Event]:
        """One look at every worker; replace those over a limit, one at a time per version."""
        events = []
        now = time.time()
        for spec in self.fleet.versions():
            if not spec.recycle.enabled or self._cooldown.get((spec.model, spec.version), 0) > time.monotonic():
                continue
            state = self._state(spec)
            if state is None:
                continue
            reports = read_reports(self.report_dir, spec.model, spec.version)
            for worker in state.workers:
                report = reports.get(worker.pid or -1)
                if report is None or worker.status != "READY":
                    continue
                why = over_limit(spec.recycle, report, now, self._trend(report))
                if why:
                    key = (spec.model, spec.version)
                    with version_lock(report_dir_of(spec, self.report_dir), *key) as mine:
                        if mine:
                            self._deferred.discard(key)
                            events.append(self.replace(spec, state, worker.pid, why))
                        elif key not in self._deferred:
                            self._deferred.add(key)
                            self.progress(f"recycling {spec.model} {spec.version} worker {worker.pid} deferred: "
                                          "apply is changing this version")
                    break
        return events

    def _trend(self, report: Report) -> Trend:
        now = time.monotonic()
        first_t, first = self._seen.setdefault(report.pid, (now, report))
        elapsed = now - first_t
        if elapsed < 1.0:
            return Trend(self._replace_s)
        return Trend(self._replace_s, max(0.0, (report.rss_mb - first.rss_mb) / elapsed),
                     max(0.0, (report.requests - first.requests) / elapsed))

    def replace(self, spec: VersionSpec, state: VersionState, pid: int, why: str) -> Event:
        """Replace worker ``pid`` of a version without dropping below its ready worker count."""
        n, ceiling = state.min_workers, state.max_workers
        started = time.monotonic()
        self.progress(f"recycling {spec.model} {spec.version} worker {pid}: {why}")
        try:
            self.client.scale(spec.model, spec.version, n + 1, max(ceiling, n + 1))
            self._wait(spec, lambda s: s.ready_workers >= n + 1, "the extra worker becoming ready")
            flag = self.report_dir / spec.model / spec.version / f"{pid}.retire"
            flag.write_text(why)
            deadline = time.monotonic() + self.grace_s
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                # Busy for the whole grace period: stop it; its in-flight batch fails once.
                os.kill(pid, signal.SIGTERM)
            retired_after = time.monotonic() - started
            self._wait(spec, lambda s: s.ready_workers >= n + 1 and pid not in {w.pid for w in s.workers},
                       "the replacement starting in the retired worker's slot")
            self.client.scale(spec.model, spec.version, n, ceiling)
            event = Event(spec.model, spec.version, pid, why, True)
            # The lead for the next decision: how long an old worker goes on serving once
            # its replacement has begun (smoothed).
            self._replace_s = 0.5 * self._replace_s + 0.5 * retired_after
            self._seen.pop(pid, None)
        except (ApiError, Unreachable, FleetError, OSError) as exc:
            self._cooldown[(spec.model, spec.version)] = time.monotonic() + self.cooldown_s
            try:
                self.client.scale(spec.model, spec.version, max(n, 1), ceiling)
            except (ApiError, Unreachable):
                pass
            event = Event(spec.model, spec.version, pid, why, False, str(exc))
            self.progress(f"recycling {spec.model} {spec.version} worker {pid} FAILED: {exc}; "
                          f"kept the old capacity, next try in {self.cooldown_s:.0f} s")
        self.events.append(event)
        self._log(event)
        if event.ok:
            self.progress(f"recycled {spec.model} {spec.version} worker {pid} ({why})")
        return event

    def _log(self, event: Event) -> None:
        # Appended, one JSON line per recycle, so `tsfleet status` can say when and why.
        self.report_dir.mkdir(parents=True, exist_ok=True)
        with open(self.report_dir / EVENTS, "a") as fh:
            fh.write(json.dumps(event.__dict__) + "\n")

    def metrics(self) -> str:
        """Prometheus text: recycles and failed recycles per model, version and reason."""
        counts: dict[tuple[str, str, str, bool], int] = {}
        for e in self.events:
            key = (e.model, e.version, e.reason.split(":", 1)[0], e.ok)
            counts[key] = counts.get(key, 0) + 1
        lines = ["# HELP tsfleet_worker_recycles_total Workers replaced by the recycler.",
                 "# TYPE tsfleet_worker_recycles_total counter"]
        for (model, version, reason, ok), n in sorted(counts.items()):
            lines.append(f'tsfleet_worker_recycles_total{{model="{model}",version="{version}",'
                         f'reason="{reason}",outcome="{"ok" if ok else "failed"}"}} {n}')
        return "\n".join(lines) + "\n"

    def run(self, interval_s: float = 2.0, stop: Callable[[], bool] = lambda: False) -> None:
        """Tick until ``stop()``; TorchServe being away is waited out, not fatal."""
        while not stop():
            try:
                self.tick()
            except Unreachable as exc:
                self.progress(f"recycler waiting: {exc}")
            time.sleep(interval_s)
