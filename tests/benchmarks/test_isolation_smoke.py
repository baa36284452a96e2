"""The batch isolation benchmark (benchmarks/isolation) in its --smoke mode, end to end: a real
TorchServe and the router, hostile bodies sent beside well-formed requests on every path."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.integration]

PATHS = ("direct-rest", "router-rest", "direct-grpc", "router-grpc")


def test_smoke_run_fails_no_batch_mate_and_writes_the_table(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.isolation", "--smoke", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = json.loads((tmp_path / "benchmarks" / "results" / "isolation.json").read_text())["rows"]
    # A form is REST only: gRPC carries no content type.
    assert sorted((r["body"], r["path"]) for r in rows) == sorted(
        [("deep-list", p) for p in PATHS] + [("form-to-image", "direct-rest"), ("form-to-image", "router-rest")])
    for row in rows:
        where = f"{row['body']} over {row['path']}"
        assert row["good_requests"] > 0 and row["good_failed"] == 0, (where, row["errors"])
        assert row["bad_requests"] > 0, where
        if row["path"].endswith("rest"):  # the hostile body really shared batches with the others
            assert row["bad_batched"] > 0, where
        for status in row["bad_statuses"]:
            if row["path"].endswith("rest"):
                assert 400 <= int(status) < 500, (where, status, row["bad_answers"])
            elif status.startswith("OK"):  # TorchServe's JSON error body inside an OK reply
                assert status.startswith("OK/4"), (where, status, row["bad_answers"])
            else:
                assert status not in ("INTERNAL", "UNAVAILABLE", "UNKNOWN"), (where, status, row["bad_answers"])
        assert row["workers_watched"] > 0 and row["restarts"] == 0, (where, row["restarted"])
    text = (tmp_path / "docs" / "isolation.md").read_text()
    assert ("| bad body | path | bad requests answered | of them in a shared batch | well-behaved requests that"
            " failed | worker restarts |" in text)
    assert "| deep-list | router-grpc |" in text and "python -m benchmarks.isolation --smoke" in text
