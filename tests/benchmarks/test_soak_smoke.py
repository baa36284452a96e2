"""The soak (benchmarks/soak) for 40 s with 8 clients, end to end: the fleet as `tsfleet up`
starts it, every path loaded through the router, a recycle, a kill -9 and a canary on the way.
It must fail no request and write its JSON, table and plot. Memory slopes are not judged this
short (each series needs 60 s of samples after the warm-up); the 10-minute run judges them."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.reliability]


def test_a_short_soak_fails_no_request_and_writes_its_report(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.soak", "--minutes", "0.67", "--clients", "8",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout[-6000:] + proc.stderr[-3000:]
    data = tmp_path / "benchmarks" / "results" / "soak.json"
    assert data.is_file(), out
    doc = json.loads(data.read_text())
    assert doc["totals"]["requests"] > 0 and doc["totals"]["failed"] == 0, (doc["totals"], doc["errors"][:5])
    # Every path was loaded: REST and gRPC per model, and the workflow.
    assert len(doc["paths"]) == 7 and all(p["requests"] > 0 and p["failed"] == 0 for p in doc["paths"]), doc["paths"]
    assert {p["kind"] for p in doc["processes"]} >= {"frontend", "worker", "router", "recycler"}
    assert all(p["samples"] for p in doc["processes"])
    # What happened on the way, each with its time: the gate's other checks.
    assert any(r["ok"] for r in doc["recycles"]), doc["recycles"]
    assert [e["what"] for e in doc["events"] if e["what"] in ("kill -9", "weight change")] == [
        "kill -9", "weight change", "weight change"], doc["events"]
    assert proc.returncode == 0, out
    assert all(c["ok"] for c in doc["checks"]), doc["checks"]
    text = (tmp_path / "docs" / "soak.md").read_text()
    assert text.startswith("# Soak") and "| path | requests | failed |" in text and "| check | result |" in text
    assert "](soak.png)" in text
    assert (tmp_path / "docs" / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
