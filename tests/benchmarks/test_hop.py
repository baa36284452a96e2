"""The router hop benchmark (benchmarks/speed/hop.py) in its --smoke mode, end to end: a
stand-in upstream answering REST and gRPC at once and in batches, the real router in front."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_smoke_run_measures_both_upstreams_and_writes_the_table(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed.hop", "--smoke", "--processes", "1",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    doc = json.loads((tmp_path / "benchmarks" / "results" / "router-hop.json").read_text())
    assert [(r["protocol"], r["batch_ms"], r["processes"], r["clients"]) for r in doc["rows"]] == [
        ("REST", 0, 1, 4), ("gRPC", 0, 1, 4), ("REST", 2, 1, 4), ("gRPC", 2, 1, 4)]
    assert {r["body_bytes"] for r in doc["rows"]} == {36}  # the one-line JSON body
    for row in doc["rows"]:
        for side in ("direct", "routed"):
            assert row[side]["requests"] > 0 and row[side]["failed"] == 0
            assert 0 < row[side]["p50_ms"] <= row[side]["p99_ms"]
        assert row["router_cpu_us_per_request"] > 0
    for batched in doc["rows"][2:]:
        assert batched["direct"]["p50_ms"] >= 1.5  # the stand-in really held answers for its 2 ms window
    text = (tmp_path / "docs" / "benchmarks-router-hop.md").read_text()
    assert "| REST | answers at once | 1 | 36 B | 4 |" in text and "| gRPC | batches every 2 ms | 1 | 36 B | 4 |" in text
    assert "![router hop](bench_router_hop.png)" in text
    assert (tmp_path / "docs" / "bench_router_hop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert doc["meta"]["command"] == "python -m benchmarks.speed.hop --smoke --processes 1"
