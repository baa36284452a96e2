"""The router process sweep's report (benchmarks/speed/processes.py): one row per model,
concurrency and protocol, a column per process count, misses marked."""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.speed.processes import table, write


def _row(direct: float, routed: float, busy: float) -> dict:
    return {"direct": {"rps": direct}, "router": {"rps": routed}, "ratio": round(routed / direct, 3),
            "router_cpu_ms_per_request": 0.12, "serving_cpus_busy": {"direct": busy, "router": busy + 0.1}}


DOC = {
    "counts": [1, 4],
    "models": {"image-classifier": {
        "1": {"64": {"rest": _row(10000, 7600, 0.3), "grpc": _row(9000, 7000, 0.4)}},
        "4": {"64": {"rest": _row(11000, 10000, 0.3), "grpc": _row(9500, 9200, 0.45)}},
    }},
    "meta": {"command": "python -m benchmarks.speed --router-processes 1 4", "cpu_count": 16, "cpu_model": "x",
             "gpu": False, "load_tool": "wrk", "date": "2026-11-26"},
}


def test_a_column_per_count_and_misses_marked() -> None:
    lines = table(DOC)
    assert lines[0].startswith("| model | clients | protocol | direct | 1 process | 4 processes |")
    rest = next(line for line in lines if "| REST |" in line)
    # Direct's column is the middle of its per-count figures (here the higher of two), with its busy share.
    assert "| 11000, 30% |" in rest
    assert "7600 (0.76 miss), 0.12 ms, 40%" in rest
    assert "10000 (0.91), 0.12 ms, 40%" in rest
    grpc_row = next(line for line in lines if "| gRPC |" in line)
    assert "9200 (0.97)" in grpc_row and "7000 (0.78 miss)" in grpc_row


def test_write_puts_the_data_beside_its_table(tmp_path: Path) -> None:
    data, text = write(dict(DOC), tmp_path)
    assert json.loads(data.read_text())["counts"] == [1, 4]
    assert data == tmp_path / "benchmarks" / "results" / "router-processes.json"
    body = text.read_text()
    assert "`python -m benchmarks.speed --router-processes 1 4` on 16 CPUs" in body
    assert "| image-classifier | 64 | REST |" in body
