"""Worker recycling: replace a worker past its request, age or memory limit, losing nothing.

TorchServe can neither recycle a worker nor retire a chosen one: a worker process that exits
fails the batch the frontend has already taken for it, and scale-down removes the newest
worker, busy or not. So the worker is replaced in place (handlers/handover.py): asked by a
``<pid>.retire`` file, it starts a fresh process that loads the model while it goes on
serving, then hands its connection over between two requests. TorchServe keeps seeing the
same worker (its pid too), the worker count never drops and no accepted request fails. One
replacement at a time per model version; a failed one (the fresh process could not load the
model, or took longer than ``ready_timeout_s``) leaves the old process serving, is reported,
and that version waits ``cooldown_s`` before the next try.
"""
from __future__ import annotations

import contextlib
import json
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from handlers.contract import pid_alive, retire_path
from tsfleet.control.client import ManagementClient
from tsfleet.errors import ApiError, FleetError, StorageError, Unreachable
from tsfleet.files import write_atomically
from tsfleet.control.locks import report_dir_of, version_lock
from tsfleet.manifest import Fleet, RecyclePolicy, VersionSpec, load_fleet

EVENTS = "recycle-events.jsonl"
EVENTS_MAX_BYTES = 256 * 1024  # then the file keeps only each version's newest event (all status reads)
KEPT_EVENTS = 1000  # in memory, for whoever watches a recycler in process


@dataclass(frozen=True)
class Report:
    """What a worker says about itself (handlers/lifecycle.py writes it)."""

    pid: int
    requests: int
    started: float
    rss_mb: float
    cuda_mb: float
    process: int = 0  # the process serving now (not the pid after a replacement)


@dataclass(frozen=True)
class Event:
    model: str
    version: str
    pid: int
    reason: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0  # from the request to the fresh process serving (or the failure)
    at: float = field(default_factory=time.time)


def read_reports(report_dir: Path, model: str, version: str) -> dict[int, Report]:
    """The reports of this version's live workers (a killed worker's file is skipped)."""
    reports = {}
    for path in (report_dir / model / version).glob("*.json"):
        try:
            doc = json.loads(path.read_text())
            if not pid_alive(int(doc["pid"])):
                continue
            reports[int(doc["pid"])] = Report(int(doc["pid"]), int(doc["requests"]), float(doc["started"]),
                                              float(doc["rss_mb"]), float(doc.get("cuda_mb", 0.0)),
                                              int(doc.get("process", doc["pid"])))
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


def _stamp(path: Path | None) -> tuple[int, int] | None:
    """When and how big the file was last written; None for no file."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def watched(fleet: Fleet) -> str:
    """The versions with a recycle policy, for the log."""
    names = [f"{v.model} {v.version}" for v in fleet.versions() if v.recycle.enabled]
    return ", ".join(names) if names else "nothing: no version has a recycle policy"


class Recycler:
    """Watches every worker of the fleet's versions that have a policy, and replaces them."""

    def __init__(self, fleet: Fleet, client: ManagementClient, report_dir: Path,
                 progress: Callable[[str], None] = print, ready_timeout_s: float = 300, cooldown_s: float = 60,
                 manifest: Path | None = None):
        self.fleet, self.client, self.report_dir, self.progress = fleet, client, report_dir, progress
        # Followed as it changes: versions apply adds or retires, policies edited.
        self.manifest, self._manifest_stamp = manifest, _stamp(manifest)
        self.ready_timeout_s, self.cooldown_s = ready_timeout_s, cooldown_s
        self.events: deque[Event] = deque(maxlen=KEPT_EVENTS)
        self._counts: dict[tuple[str, str, str, bool], int] = {}  # for /metrics, over the process's life
        self._cooldown: dict[tuple[str, str], float] = {}
        self._seen: dict[int, tuple[float, Report]] = {}  # first sighting of each pid
        self._replace_s = 5.0  # learnt from the replacements done so far
        self._deferred: set[tuple[str, str]] = set()  # versions whose change lock apply holds
        # (ready, wanted) workers per fleet version at the last look, for /metrics: a version
        # short of workers (one that cannot start, workers that keep dying) is worth an alert.
        self.workers: dict[tuple[str, str], tuple[int, int]] = {}

    def follow_manifest(self) -> None:
        """Take the manifest again if its file changed since the last look. Without this a
        version apply retired stayed in the gauges as 0 ready of 1 wanted (an alert firing
        for nothing), and one apply added was neither recycled nor counted."""
        stamp = _stamp(self.manifest)
        if stamp is None or stamp == self._manifest_stamp:
            return
        self._manifest_stamp = stamp
        try:
            fleet = load_fleet(self.manifest)
        except FleetError as exc:
            self.progress(f"recycler: {exc}; still following the manifest as it was")
            return
        changed, self.fleet = fleet.versions() != self.fleet.versions(), fleet
        if changed:
            self.progress(f"recycler: {self.manifest} changed; recycling " + watched(fleet))

    def tick(self) -> list[Event]:
        """One look at every worker; replace those over a limit, one at a time per version."""
        self.follow_manifest()
        events = []
        now = time.time()
        try:
            registered = {(v.model, v.version): v for vs in self.client.state().values() for v in vs}
        except Unreachable:
            self.workers = {}  # absent, not stale: TorchServe is away
            raise
        except ApiError:
            return events  # a model unregistered between listing and describing it: next look
        self.workers = {(s.model, s.version): (registered[(s.model, s.version)].ready_workers
                                               if (s.model, s.version) in registered else 0, s.serving.workers)
                        for s in self.fleet.versions()}
        for spec in self.fleet.versions():
            if not spec.recycle.enabled or self._cooldown.get((spec.model, spec.version), 0) > time.monotonic():
                continue
            state = registered.get((spec.model, spec.version))
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
                            events.append(self.replace(spec, worker.pid, why))
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

    def replace(self, spec: VersionSpec, pid: int, why: str) -> Event:
        """Replace the process behind worker ``pid`` of a version, in place."""
        folder = self.report_dir / spec.model / spec.version
        old = read_reports(self.report_dir, spec.model, spec.version).get(pid)
        flag = retire_path(folder, pid)
        started, asked = time.monotonic(), time.time()
        self.progress(f"recycling {spec.model} {spec.version} worker {pid}: {why}")
        try:
            # Whole or not at all: a flag the disk could not take is a failed recycle, said
            # as such, and the recycler goes on.
            write_atomically(flag, why)
            self._wait_replaced(folder, pid, old.process if old else pid, asked, flag)
            took = time.monotonic() - started
            event = Event(spec.model, spec.version, pid, why, True, seconds=round(took, 2))
            # The lead for the next decision: how long an old process goes on serving once
            # its replacement has begun (smoothed).
            self._replace_s = 0.5 * self._replace_s + 0.5 * took
            self._seen.pop(pid, None)
        except FleetError as exc:
            # The worker stops its successor and goes on serving. A read-only disk refuses even
            # to remove a flag it never took: nothing to undo then, and the recycler goes on.
            with contextlib.suppress(OSError):
                flag.unlink(missing_ok=True)
            self._cooldown[(spec.model, spec.version)] = time.monotonic() + self.cooldown_s
            event = Event(spec.model, spec.version, pid, why, False, str(exc),
                          round(time.monotonic() - started, 2))
            self.progress(f"recycling {spec.model} {spec.version} worker {pid} FAILED: {exc}; "
                          f"the old process keeps serving, next try in {self.cooldown_s:.0f} s")
        self._record(event)
        if event.ok:
            self.progress(f"recycled {spec.model} {spec.version} worker {pid} in {event.seconds:.1f} s ({why})")
        return event

    def _wait_replaced(self, folder: Path, pid: int, old_process: int, asked: float, flag: Path) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            try:
                doc = json.loads((folder / f"{pid}.json").read_text())
            except (OSError, ValueError):
                doc = {}
            if doc.get("process", old_process) != old_process and float(doc.get("started", 0)) >= asked:
                return
            if not flag.exists() and doc.get("handover_error") and float(doc.get("updated", 0)) >= asked:
                raise FleetError(f"worker {pid} was not replaced: {doc['handover_error']}")
            if not pid_alive(pid):
                raise FleetError(f"worker {pid} died while being replaced (TorchServe restarts its slot)")
            time.sleep(0.1)
        raise FleetError(f"worker {pid}: no fresh process took over within {self.ready_timeout_s:.0f} s")

    def _record(self, event: Event) -> None:
        self.events.append(event)
        key = (event.model, event.version, event.reason.split(":", 1)[0], event.ok)
        self._counts[key] = self._counts.get(key, 0) + 1
        self._log(event)

    def _log(self, event: Event) -> None:
        # Appended, one JSON line per recycle, so `tsfleet status` can say when and why.
        path = self.report_dir / EVENTS
        try:
            self.report_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as fh:
                fh.write(json.dumps(event.__dict__) + "\n")
            if path.stat().st_size > EVENTS_MAX_BYTES:  # a fleet that runs for months
                write_atomically(path, "".join(json.dumps(doc) + "\n" for doc in last_events(self.report_dir).values()))
        except OSError as exc:  # a full disk: the recycle happened, /metrics counts it; only the record is lost
            said = str(exc) if isinstance(exc, StorageError) else f"{path}: {StorageError.cause(exc)}"
            self.progress(f"recycle of {event.model} {event.version} worker {event.pid} not recorded: {said}")

    def collect(self) -> Iterator[Metric]:
        """Recycles and failed recycles per model, version and reason, and each version's
        ready and wanted workers (a Prometheus collector, read when /metrics is)."""
        recycles = CounterMetricFamily("tsfleet_worker_recycles_total", "Workers replaced by the recycler.",
                                       labels=("model", "version", "reason", "outcome"))
        for (model, version, reason, ok), n in sorted(self._counts.items()):
            recycles.add_metric((model, version, reason, "ok" if ok else "failed"), n)
        yield recycles
        workers = sorted(self.workers.items())  # one read: tick() replaces it whole, in another thread
        for i, (name, help_text) in enumerate((("tsfleet_workers_ready", "Ready workers per fleet version."),
                                               ("tsfleet_workers_wanted", "Workers fleet.yaml asks for per version."))):
            gauge = GaugeMetricFamily(name, help_text, labels=("model", "version"))
            for arm, pair in workers:
                gauge.add_metric(arm, pair[i])
            yield gauge

    def metrics(self) -> str:
        """The Prometheus text of ``collect`` (prometheus_client writes and escapes it)."""
        return generate_latest(self).decode()

    def run(self, interval_s: float = 2.0, stop: Callable[[], bool] = lambda: False) -> None:
        """Tick until ``stop()``; TorchServe being away is waited out, not fatal."""
        while not stop():
            try:
                self.tick()
            except Unreachable as exc:
                self.progress(f"recycler waiting: {exc}")
            time.sleep(interval_s)
