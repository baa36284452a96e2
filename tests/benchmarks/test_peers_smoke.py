"""The peer comparison cannot rot: every peer (FastAPI, LitServe, mosec, Ray Serve) starts
as benchmarks/speed/peers starts it, answers every request of the set as the in-process
reference does, serves a short closed loop with every answer checked, and the report names
each. Speed is judged by `make bench-peers`, not here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.speed.peer_runs import MAX_DEVIATION, check_answers, started
from benchmarks.speed.peers import KINDS
from benchmarks.speed.peers.models import PeerConfig
from benchmarks.speed.workload import Pipeline, workload

ROOT = Path(__file__).resolve().parents[2]
MODEL = "image-classifier"  # the fast one: the smoke test is about the wiring

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def peers_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("peers")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--peers", "--smoke", "--models", MODEL,
                           "--scenarios", "peers", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def test_every_peer_served_the_right_answers(peers_run: Path) -> None:
    doc = json.loads((peers_run / "benchmarks" / "results" / "peers.json").read_text())
    entry = doc["models"][MODEL]
    assert not entry.get("peer_errors"), entry.get("peer_errors")
    assert set(entry["scenarios"]) == set(KINDS)
    for kind in KINDS:
        row = entry["scenarios"][kind]
        assert 0 <= row["max_abs_deviation"] <= MAX_DEVIATION, kind
        figures = row["by_concurrency"]["4"]
        assert figures["requests"] > 0 and figures["failed"] == 0 and figures["rps"] > 0, (kind, figures)
        # Its own processes did the work: the CPU meter found them.
        assert figures["cpu_ms_per_request"]["rest_user_ms"] > 0, kind
    assert set(doc["meta"]["peer_versions"]) >= {"litserve", "mosec", "ray", "fastapi"}
    report = (peers_run / "docs" / "benchmarks-peers.md").read_text()
    for name in ("LitServe", "mosec", "Ray Serve", "FastAPI + uvicorn workers", "FastAPI, tutorial default"):
        assert f"| {name} |" in report
    assert (peers_run / "docs" / f"bench_peers_{MODEL}.png").stat().st_size > 10_000


def test_a_peer_with_other_answers_is_refused(tmp_path: Path) -> None:
    w = workload(MODEL)
    reference = Pipeline(w).answers(w.items)
    with started("mosec", PeerConfig(MODEL, w.artifacts, 4, 5, 1, 1), w, tmp_path) as server:
        assert check_answers(server.url, w, reference, {}) <= MAX_DEVIATION
        shifted = [{**r, "top_k": [{**t, "score": t["score"] + 0.01} for t in r["top_k"]]} for r in reference]
        with pytest.raises(RuntimeError, match="differ from the reference by 1.00e-02"):
            check_answers(server.url, w, shifted, {})
    assert not server.pids()  # stopped with every process of its session
