"""A TorchServe of its own serving only the leaking test model, and a paced client for it:
what the recycling and handover tests share."""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
import requests

from tests.fixtures.leaky import leaky_manifest
from tests.integration.conftest import ROOT, new_server
from tsfleet.build.archive import Builder
from tsfleet.manifest import Fleet, parse_fleet
from tsfleet.control.recycle import Recycler, read_reports
from tsfleet.control.server import TorchServe

LEAK_MB = 2


def leaky_fleet(report_dir: Path, **recycle: int) -> Fleet:
    return parse_fleet(leaky_manifest(report_dir, LEAK_MB * 1024, 1, **recycle), ROOT)


@pytest.fixture(scope="module")
def leaky(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TorchServe, Path]]:
    base = tmp_path_factory.mktemp("leaky")
    reports = base / "reports"
    fleet = leaky_fleet(reports)
    Builder(fleet, base / "store", base / "cache", progress=lambda line: None).build_all()
    ts = new_server(fleet, base / "store", base)
    ts.start(snapshots=False)
    try:
        ts.wait_ready(fleet, timeout=180, progress=lambda line: None)
        yield ts, reports
    finally:
        ts.stop()


class Load:
    """A paced, bounded client that records every answer (status, serving pid): ``n``
    requests, and past that, while ``more()`` says so, up to twice as many."""

    def __init__(self, ts: TorchServe, n: int, per_s: float):
        self.ts, self.n, self.per_s = ts, n, per_s
        self.more: Callable[[], bool] = lambda: False
        self.results: list[tuple[int, int | None]] = []

    def run(self) -> None:
        session, url = requests.Session(), self.ts.ep.url("inference") + "/predictions/leaky"
        headers = {**self.ts.keys.header("inference"), "Content-Type": "application/json"}
        start = time.monotonic()
        for i in range(2 * self.n):
            if i >= self.n and not self.more():
                break
            resp = session.post(url, data=b'{"i": %d}' % i, headers=headers, timeout=60)
            self.results.append((resp.status_code, resp.json().get("pid") if resp.status_code == 200 else None))
            ahead = start + (i + 1) / self.per_s - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # pacing the load generator, not waiting for a condition


def recycle_during(ts: TorchServe, fleet: Fleet, reports: Path, load: Load, rss: list[float],
                   recycles: int = 0) -> Recycler:
    """Run ``load`` with a recycler ticking beside it; the load goes on past its ``n`` until
    ``recycles`` replacements succeeded (a slow box starts replacements more slowly)."""
    recycler = Recycler(fleet, ts.client, reports, progress=lambda line: None)
    load.more = lambda: sum(e.ok for e in recycler.events) < recycles
    done = threading.Event()
    client_thread = threading.Thread(target=lambda: (load.run(), done.set()))
    client_thread.start()
    while not done.wait(0.1):
        recycler.tick()
        rss.extend(r.rss_mb for r in read_reports(reports, "leaky", "1.0").values())
    client_thread.join()
    return recycler


