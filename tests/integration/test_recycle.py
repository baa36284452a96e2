"""Worker recycling on a real TorchServe, proven on a model that leaks memory per request."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.leaky import leaky_manifest
from tests.fixtures.locking import held_elsewhere
from tests.integration.conftest import ROOT
from tests.integration.leaky_server import LEAK_MB, Load, leaky, leaky_fleet, recycle_during  # noqa: F401 (fixture)
from tests.prometheus_text import samples, value
from tsfleet.control.locks import version_lock
from tsfleet.manifest import parse_fleet
from tsfleet.control.recycle import Recycler, read_reports

pytestmark = pytest.mark.slow


def test_max_rss_keeps_a_leaking_worker_bounded(leaky) -> None:
    ts, reports = leaky
    baseline = max(r.rss_mb for r in read_reports(reports, "leaky", "1.0").values())
    ceiling = int(baseline + 60)
    # 30 requests/s (60 MB/s of leak): a replacement takes a few seconds on a 2-core box (a
    # fresh process loads the model), so the leak while one is under way stays inside the bound.
    load, rss = Load(ts, n=1200, per_s=30), []
    recycler = recycle_during(ts, leaky_fleet(reports, max_rss_mb=ceiling), reports, load, rss, recycles=5)
    leaked_without_recycling = len(load.results) * LEAK_MB
    assert leaked_without_recycling >= 2000  # what the one worker would hold without recycling
    oks = [e for e in recycler.events if e.ok]
    assert len(oks) >= 5 and all(e.reason.startswith("max_rss") for e in oks)
    # Bounded: the ceiling plus what leaks while a replacement starts (a few seconds of load).
    assert max(rss) < ceiling + 400, (max(rss), ceiling)
    failed = [code for code, _ in load.results if code != 200]
    print(f"max_rss: {len(oks)} recycles, peak {max(rss):.0f} MB (ceiling {ceiling}), {len(failed)} failed of {len(load.results)}")
    assert failed == []  # even for a client that calls TorchServe directly, without retries
    assert len({pid for _, pid in load.results if pid}) >= len(oks)


def test_max_requests_with_jitter_replaces_workers_in_turn(leaky) -> None:
    ts, reports = leaky
    fleet = leaky_fleet(reports, max_requests=40, max_requests_jitter=10)
    load, rss = Load(ts, n=600, per_s=50), []
    recycler = recycle_during(ts, fleet, reports, load, rss, recycles=3)
    oks = [e for e in recycler.events if e.ok]
    failed = [code for code, _ in load.results if code != 200]
    print(f"max_requests: {len(oks)} recycles, {len(failed)} failed of {len(load.results)}")
    assert len(oks) >= 3 and all(e.reason.startswith("max_requests") for e in oks)
    assert failed == []
    pids = [pid for _, pid in load.results if pid]
    served_by = {pid: pids.count(pid) for pid in set(pids)}
    # Each process serves up to its limit (40-50), plus what comes while its successor loads
    # (at 50 requests/s), plus a second's worth for the reports' and the recycler's pace.
    bound = 50 + 50 * (max(e.seconds for e in oks) + 1)
    assert all(n <= bound for n in served_by.values()), (served_by, bound)
    state = ts.client.describe("leaky")[0]
    assert state.min_workers == 1 and state.ready_workers == 1  # back to the declared count
    assert "tsfleet_worker_recycles_total" in recycler.metrics()


def test_max_age_replaces_a_worker_that_lived_too_long(leaky) -> None:
    ts, reports = leaky
    fleet = leaky_fleet(reports, max_age_s=3)
    load, rss = Load(ts, n=400, per_s=50), []
    recycler = recycle_during(ts, fleet, reports, load, rss, recycles=2)
    oks = [e for e in recycler.events if e.ok]
    failed = [code for code, _ in load.results if code != 200]
    assert len(oks) >= 2 and all(e.reason.startswith("max_age") for e in oks), recycler.events
    assert failed == []
    assert len({pid for _, pid in load.results if pid}) >= 2  # served by successive workers
    state = ts.client.describe("leaky")[0]
    assert state.min_workers == 1 and state.ready_workers == 1


def test_recycling_under_load_through_the_router_fails_no_request(leaky, tmp_path: Path) -> None:

    from tests.integration.router_harness import RunningRouter

    ts, reports = leaky
    fleet = leaky_fleet(reports, max_requests=100, max_requests_jitter=20)
    router = RunningRouter(fleet, tmp_path, ts.ep.url("inference"), f"127.0.0.1:{ts.ep.grpc_inference}")
    recycler = Recycler(fleet, ts.client, reports, progress=lambda line: None)
    headers = {**ts.keys.header("inference"), "Content-Type": "application/json"}
    stop = threading.Event()

    def recycle_loop() -> None:
        while not stop.wait(0.1):
            recycler.tick()

    results: list[tuple[int, str]] = []
    enough = threading.Event()

    def client_loop(n: int) -> None:
        # 16 clients at 4 requests/s each, until 4 recycles are done (at most 120 s): a paced
        # load keeps the leak (2 MB a request) and each replacement's length the same whatever
        # the speed of the box and the router.
        start = time.monotonic()
        for i in range(480):
            if enough.is_set():
                return
            resp = router.post("/predictions/leaky", b'{"i": %d}' % (n * 1000 + i), headers)
            results.append((resp.status_code, resp.text))
            ahead = start + (i + 1) / 4 - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # pacing the load generator, not waiting for a condition

    watcher = threading.Thread(target=recycle_loop)
    watcher.start()
    clients = [threading.Thread(target=client_loop, args=(n,)) for n in range(16)]
    try:
        for c in clients:
            c.start()
        deadline = time.monotonic() + 120
        while sum(e.ok for e in recycler.events) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        enough.set()
        for c in clients:
            c.join()
    finally:
        enough.set()
        stop.set()
        watcher.join()
        router.stop()
    failed = [r for r in results if r[0] != 200]
    oks = [e for e in recycler.events if e.ok]
    print(f"through the router: {len(oks)} recycles, {len(failed)} failed of {len(results)}")
    assert len(oks) >= 4, recycler.events
    assert failed == []


def test_recycler_and_apply_take_turns_on_a_version(leaky) -> None:
    from tsfleet.control.apply import apply

    ts, reports = leaky
    fleet = leaky_fleet(reports, max_requests=20)
    said: list[str] = []
    recycler = Recycler(fleet, ts.client, reports, progress=said.append)
    with version_lock(reports, "leaky", "1.0") as mine:  # what apply holds while it changes 1.0
        assert mine
        Load(ts, n=40, per_s=50).run()  # the worker is past its limit of 20 requests
        deadline = time.monotonic() + 30
        while not any("deferred: apply is changing" in line for line in said):
            assert recycler.tick() == [] and time.monotonic() < deadline, said
            time.sleep(0.2)
        assert ts.client.describe("leaky")[0].min_workers == 1  # nothing was scaled meanwhile
    events = recycler.tick()  # free again: the replacement happens now
    assert [e.ok for e in events] == [True], events

    # apply waits for a replacement under way instead of scaling under its feet.
    two = parse_fleet(leaky_manifest(reports, LEAK_MB * 1024, 2), ROOT)
    lines: list[str] = []
    waiting = threading.Event()

    def progress(line: str) -> None:
        lines.append(line)
        if "waiting for the recycler to finish with leaky 1.0" in line:
            waiting.set()  # the replacement under way ends now

    try:
        with held_elsewhere(reports, "leaky", "1.0", release=waiting):
            steps = apply(two, ts.client, progress, report_dir=reports)
        assert [s.action for s in steps] == ["scale"]
        assert any("waiting for the recycler to finish with leaky 1.0" in line for line in lines), lines
        assert ts.client.describe("leaky")[0].min_workers == 2
    finally:
        apply(leaky_fleet(reports), ts.client, lambda line: None, report_dir=reports)
    assert ts.client.describe("leaky")[0].min_workers == 1


def test_the_recycler_reports_versions_short_of_workers(server, fleet) -> None:
    # Alert on tsfleet_workers_ready < tsfleet_workers_wanted: a version that does not start
    # (up serves the rest without it) or whose workers keep dying is otherwise quiet.
    import copy

    import yaml

    doc = copy.deepcopy(yaml.safe_load((ROOT / "fleet.yaml").read_text()))
    doc["models"]["intent-classifier"]["versions"]["1.3"] = {"params": {"seed": 5}}  # never registered
    recycler = Recycler(parse_fleet(doc, ROOT), server.client, server.report_dir, progress=lambda line: None)
    assert recycler.tick() == []  # no version has a policy: nothing to replace
    text = recycler.metrics()
    assert value(text, "tsfleet_workers_ready", model="intent-classifier", version="1.0") == 1
    assert value(text, "tsfleet_workers_wanted", model="intent-classifier", version="1.0") == 1
    assert value(text, "tsfleet_workers_ready", model="intent-classifier", version="1.3") == 0
    assert value(text, "tsfleet_workers_wanted", model="intent-classifier", version="1.3") == 1
    assert len(samples(text, "tsfleet_workers_ready")) == 5
