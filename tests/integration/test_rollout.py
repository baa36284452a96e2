"""A canary rollout from start to promote with the CLI, through the router, on a real TorchServe."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from tests.integration.conftest import ROOT, new_server
from tests.integration.router_harness import RunningRouter
from tsfleet.manifest import load_fleet, parse_fleet
from tsfleet.router.policy.routing import RollbackRule

pytestmark = pytest.mark.slow


def intent_fleet():
    doc = copy.deepcopy(yaml.safe_load((ROOT / "fleet.yaml").read_text()))
    doc["models"] = {"intent-classifier": doc["models"]["intent-classifier"]}
    doc["workflows"] = {}
    return parse_fleet(doc, ROOT)


@pytest.fixture(scope="module")
def stack(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple]:
    workdir = tmp_path_factory.mktemp("rollout")
    fleet = intent_fleet()
    ts = new_server(fleet, model_store, workdir)
    ts.start(snapshots=False)
    router = None
    try:
        ts.wait_ready(fleet, timeout=180, progress=lambda line: None)
        router = RunningRouter(fleet, workdir, ts.ep.url("inference"), f"127.0.0.1:{ts.ep.grpc_inference}")
        # These tests count exact splits: no automatic rollback on a latency blip of a busy box.
        router.table.routes["intent-classifier"].rollback = RollbackRule(max_error_rate_increase=1.0, max_p99_ratio=0)
        yield ts, router, workdir
    finally:
        if router:
            router.stop()
        ts.stop()


def cli(ts, router, workdir: Path, *args: str, manifest: Path | None = None) -> subprocess.CompletedProcess:
    manifest = manifest or workdir / "fleet.yaml"
    if not manifest.exists():
        doc = yaml.safe_load((ROOT / "fleet.yaml").read_text())
        doc["models"] = {"intent-classifier": doc["models"]["intent-classifier"]}
        doc["models"]["intent-classifier"]["handler"] = str(ROOT / "handlers/intent_classifier.py")
        doc["workflows"] = {}
        manifest.write_text(yaml.safe_dump(doc))
    return subprocess.run(
        [sys.executable, "-m", "tsfleet", "--manifest", str(manifest), "--config", str(ts.config),
         "--key-file", str(ts.workdir / "key_file.json"), "--router-admin", router.admin_url,
         "--router-key-file", str(workdir / "router_key.json"), "rollout", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120)


def versions_served(ts, router, n: int) -> Counter:
    headers = {**ts.keys.header("inference"), "Content-Type": "application/json"}
    got = [router.post("/predictions/intent-classifier", json.dumps({"text": f"hi {i}"}).encode(), headers)
           for i in range(n)]
    assert all(r.status_code == 200 for r in got)
    return Counter(r.headers["X-Model-Version"] for r in got)


def test_canary_from_start_to_promote(stack) -> None:
    ts, router, workdir = stack
    start = cli(ts, router, workdir, "start", "intent-classifier", "1.1", "--weight", "10")
    assert start.returncode == 0, start.stderr
    assert "1.0 90%, 1.1 10%" in start.stdout
    served = versions_served(ts, router, 200)
    assert served == Counter({"1.0": 180, "1.1": 20})

    assert cli(ts, router, workdir, "set-weight", "intent-classifier", "1.1", "50").returncode == 0
    served_after = versions_served(ts, router, 100)
    assert served_after == Counter({"1.0": 50, "1.1": 50})
    status = cli(ts, router, workdir, "status")
    assert status.returncode == 0, status.stderr
    header, *rows = [line.split() for line in status.stdout.splitlines()]
    assert header == ["MODEL", "VERSION", "ROLE", "WEIGHT", "REQUESTS", "ERRORS", "P50", "ms", "P99", "ms",
                      "SHADOW", "(req/err/disagree)"]
    # What an operator decides on: each version's role and weight now, and every answer it gave
    # since the router started (both splits above), none of them an error. No shadow column.
    total = served + served_after
    assert [row[:6] for row in rows] == [
        ["intent-classifier", "1.0", "baseline", "50", str(total["1.0"]), "0.0%"],
        ["intent-classifier", "1.1", "candidate", "50", str(total["1.1"]), "0.0%"],
    ]
    for row in rows:  # both arms answered within the rollback window: latencies, not "-"
        assert len(row) == 8 and 0 < float(row[6]) <= float(row[7]), row

    promoted = cli(ts, router, workdir, "promote", "intent-classifier", "1.1")
    assert promoted.returncode == 0, promoted.stderr
    assert "now says default_version '1.1'" in promoted.stdout
    assert load_fleet(workdir / "fleet.yaml").models["intent-classifier"].default_version == "1.1"
    assert versions_served(ts, router, 20) == Counter({"1.1": 20})
    default = next(v for v in ts.client.describe("intent-classifier") if v.is_default)
    assert default.version == "1.1"


def test_rollback_by_hand_returns_all_traffic_to_the_baseline(stack) -> None:
    ts, router, workdir = stack
    baseline = router.admin("GET", "/routes").json()["intent-classifier"]["baseline"]
    other = "1.0" if baseline == "1.1" else "1.1"
    assert cli(ts, router, workdir, "start", "intent-classifier", other, "--weight", "30").returncode == 0
    done = cli(ts, router, workdir, "rollback", "intent-classifier")
    assert done.returncode == 0 and f"all traffic back on {baseline}" in done.stdout
    assert versions_served(ts, router, 20) == Counter({baseline: 20})


@pytest.mark.parametrize("args,message", [
    (("start", "ghost", "1.0"), "no route for ghost"),
    (("start", "intent-classifier", "7.0"), "7.0 is not registered in TorchServe"),
    (("start", "intent-classifier", "1.0", "--weight", "150"), "out of range"),
    (("set-weight", "intent-classifier", "1.0"), "needs MODEL VERSION WEIGHT"),
])
def test_rollout_mistakes_are_clear_errors(stack, args, message) -> None:
    ts, router, workdir = stack
    done = cli(ts, router, workdir, *args)
    assert done.returncode == 2, done.stdout
    assert message in done.stderr and "Traceback" not in done.stderr


def test_a_version_the_manifest_does_not_list_gets_no_canary(stack, tmp_path: Path) -> None:
    # apply retires what the manifest does not list: a canary on it would end in 404s.
    ts, router, workdir = stack
    cli(ts, router, workdir, "status")  # writes the stack's manifest
    before = router.admin("GET", "/routes").json()["intent-classifier"]
    baseline = before["baseline"]
    other = "1.0" if baseline == "1.1" else "1.1"
    doc = yaml.safe_load((workdir / "fleet.yaml").read_text())
    del doc["models"]["intent-classifier"]["versions"][other]
    doc["models"]["intent-classifier"]["default_version"] = baseline
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump(doc))
    done = cli(ts, router, workdir, "start", "intent-classifier", other, "--weight", "10", manifest=tmp_path / "fleet.yaml")
    assert done.returncode == 2 and f"intent-classifier {other} is registered but the manifest does not list it" \
        in done.stderr, done.stderr
    assert router.admin("GET", "/routes").json()["intent-classifier"]["weights"] == before["weights"]
