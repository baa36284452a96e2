"""Recycle policy decisions, without a server."""
from __future__ import annotations

from pathlib import Path

from tests.prometheus_text import samples, value
from tsfleet.manifest import RecyclePolicy
from tsfleet.control.recycle import Report, Trend, over_limit, request_limit

ROOT = Path(__file__).resolve().parents[2]


def report(**kw) -> Report:
    base = dict(pid=4242, requests=0, started=1000.0, rss_mb=300.0, cuda_mb=0.0)
    return Report(**{**base, **kw})


def test_jitter_spreads_limits_but_is_stable_per_worker() -> None:
    policy = RecyclePolicy(max_requests=1000, max_requests_jitter=100)
    limits = {pid: request_limit(policy, pid) for pid in range(1000, 1200)}
    assert all(1000 <= v <= 1100 for v in limits.values())
    assert len(set(limits.values())) > 50  # workers started together do not restart together
    assert all(request_limit(policy, pid) == v for pid, v in limits.items())
    assert request_limit(RecyclePolicy(), 1) == 0


def test_each_limit_names_itself() -> None:
    now = 5000.0
    assert over_limit(RecyclePolicy(max_requests=10), report(requests=10), now).startswith("max_requests")
    assert over_limit(RecyclePolicy(max_age_s=3600), report(started=now - 3601), now).startswith("max_age")
    assert over_limit(RecyclePolicy(max_rss_mb=512), report(rss_mb=600), now).startswith("max_rss")
    assert over_limit(RecyclePolicy(max_gpu_memory_mb=100), report(cuda_mb=150), now).startswith("max_gpu_memory")
    assert over_limit(RecyclePolicy(max_requests=10, max_rss_mb=512), report(requests=3), now) is None
    assert not RecyclePolicy().enabled


def test_a_worker_that_would_cross_a_limit_before_its_replacement_is_ready_goes_now() -> None:
    policy = RecyclePolicy(max_rss_mb=1000, max_requests=5000)
    # 900 MB, growing 50 MB/s, replacements take 4 s here: it would be at 1100 MB by then.
    assert over_limit(policy, report(rss_mb=900), 0, Trend(4.0, rss_mb_per_s=50)).startswith("max_rss")
    assert over_limit(policy, report(rss_mb=900), 0, Trend(1.0, rss_mb_per_s=50)) is None
    assert over_limit(policy, report(requests=4700), 0, Trend(4.0, requests_per_s=100)).startswith("max_requests")


def test_a_recycler_running_for_months_keeps_its_records_bounded(tmp_path) -> None:
    # 20,000 recycles (a busy fleet for weeks): the events file that `tsfleet status` reads
    # and the recycler's memory stay small; /metrics still counts them all.
    from tsfleet.manifest import Fleet
    from tsfleet.control.recycle import EVENTS, EVENTS_MAX_BYTES, KEPT_EVENTS, Event, Recycler, last_events

    recycler = Recycler(Fleet(tmp_path, {}), client=None, report_dir=tmp_path, progress=lambda line: None)
    for n in range(20_000):
        recycler._record(Event("m", "1.0" if n % 2 else "2.0", 100 + n, "max_requests: served 501", True, at=n))
    assert (tmp_path / EVENTS).stat().st_size <= EVENTS_MAX_BYTES + 1024
    assert {key: doc["pid"] for key, doc in last_events(tmp_path).items()} == {("m", "1.0"): 20_099, ("m", "2.0"): 20_098}
    assert len(recycler.events) == KEPT_EVENTS
    assert value(recycler.metrics(), "tsfleet_worker_recycles_total", model="m", version="1.0", reason="max_requests",
                 outcome="ok") == 10000


def test_the_recycler_follows_the_manifest_as_apply_changes_it(tmp_path) -> None:
    # A version apply retired must leave the gauges (else: 0 ready of 1 wanted, an alert for
    # nothing); one it added must join them; a manifest that does not load changes nothing.
    import shutil

    import yaml

    from tsfleet.control.client import VersionState, Worker
    from tsfleet.manifest import load_fleet
    from tsfleet.control.recycle import Recycler

    root = tmp_path / "repo"
    shutil.copytree(ROOT / "handlers", root / "handlers")
    manifest = root / "fleet.yaml"
    doc = yaml.safe_load((ROOT / "fleet.yaml").read_text())
    doc["workflows"] = {}  # its step names intent-classifier 1.0, which leaves below
    manifest.write_text(yaml.safe_dump(doc))

    class Server:  # what TorchServe describes: every version of the manifest with one worker READY
        def state(self) -> dict:
            return {m: [VersionState(m, v, "", v == "1.0", 1, 5, 120, 1, 1, (Worker("1", 10, "READY", "", 0),))
                        for v in versions] for m, versions in registered.items()}

    registered = {"intent-classifier": ["1.0", "1.1"]}
    lines: list[str] = []
    recycler = Recycler(load_fleet(manifest), Server(), tmp_path / "reports", lines.append, manifest=manifest)

    def gauges() -> dict[tuple[str, str], float]:
        return {(labels["model"], labels["version"]): n
                for labels, n in ((dict(k), n) for k, n in samples(recycler.metrics(), "tsfleet_workers_ready").items())}

    recycler.tick()
    assert gauges()[("intent-classifier", "1.0")] == 1
    del doc["models"]["intent-classifier"]["versions"]["1.0"]
    doc["models"]["intent-classifier"]["default_version"] = "1.1"
    doc["models"]["intent-classifier"]["recycle"] = {"max_requests": 500}
    manifest.write_text(yaml.safe_dump(doc))
    registered["intent-classifier"] = ["1.1"]  # what apply did
    recycler.tick()
    assert ("intent-classifier", "1.0") not in gauges(), (lines, gauges())
    assert gauges()[("intent-classifier", "1.1")] == 1
    assert lines[-1] == f"recycler: {manifest} changed; recycling intent-classifier 1.1"

    manifest.write_text("models: [")  # half-saved by an editor
    recycler.tick()
    assert "not valid YAML" in lines[-1] and lines[-1].endswith("still following the manifest as it was")
    assert gauges()[("intent-classifier", "1.1")] == 1
