"""The speed suite in its --smoke mode, end to end: the in-process limit and a real
TorchServe (toolkit handlers, tuned row) with the router in front, written to a temp dir.
Figures are checked for shape and sanity only; speed is judged by `make bench`, not here."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ("text-embedder", "image-classifier")

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--smoke", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out


def _check_figures(figures: dict) -> None:
    assert figures["requests"] > 0
    assert figures["failed"] == 0
    assert figures["rps"] > 0
    assert 0 < figures["p50_ms"] <= figures["p99_ms"]
    assert all(math.isfinite(figures[k]) for k in ("rps", "p50_ms", "p99_ms"))


def test_json_has_every_figure_with_its_machine(smoke_run: Path) -> None:
    doc = json.loads((smoke_run / "benchmarks" / "results" / "latest.json").read_text())
    meta = doc["meta"]
    assert "errors" not in doc
    assert meta["cpu_count"] >= 1 and meta["mode"] == "smoke" and meta["load_tool"] == "python"
    for key in ("date", "python", "torch", "torchserve", "fastapi", "uvicorn", "gpu", "settings"):
        assert key in meta
    for model in MODELS:
        entry = doc["models"][model]
        limit = entry["limit"]
        assert limit["processes"] == meta["cpu_count"]
        assert set(limit["by_batch"]) == {"1", "8"}
        assert all(b["rate"] > 0 for b in limit["by_batch"].values())
        assert limit["ceiling"] == max(b["rate"] for b in limit["by_batch"].values())
        assert set(entry["scenarios"]) == {"toolkit-tuned", "router-rest"}
        for row in entry["scenarios"].values():
            assert set(row["by_concurrency"]) == {"4"}
            _check_figures(row["by_concurrency"]["4"])
        assert all(rss > 0 for rss in entry["scenarios"]["toolkit-tuned"]["peak_rss_mb"])
        # The CPU breakdown: the workers did the model's work; only the routed row used the router.
        direct_row = entry["scenarios"]["toolkit-tuned"]["by_concurrency"]["4"]
        direct = direct_row["cpu_ms_per_request"]
        routed = entry["scenarios"]["router-rest"]["by_concurrency"]["4"]["cpu_ms_per_request"]
        assert direct["workers_user_ms"] > 0 and routed["workers_user_ms"] > 0
        # While clients call TorchServe directly the router only keeps its timers: a clock
        # tick or two (10 ms each) of CPU in the whole window, not a share of each request.
        idle = direct["router_user_ms"] + direct["router_sys_ms"]
        assert idle * direct_row["requests"] <= 30, (idle, direct_row["requests"])
        assert routed["router_user_ms"] + routed["router_sys_ms"] > idle
        # The paced comparison: both sides under the same offered load, below direct's capacity.
        paced = entry["overhead"]["REST"]["4"]
        capacity = entry["scenarios"]["toolkit-tuned"]["by_concurrency"]["4"]["rps"]
        for side in ("direct", "router"):
            _check_figures(paced[side])
            assert paced[side]["rps"] < 0.8 * capacity, (side, paced[side]["rps"], capacity)
        assert math.isfinite(paced["added_p50_ms"])
        # Side by side: direct and routed halves in the same windows, and the A/A control.
        both = entry["side_by_side"]["REST"]["4"]
        for load in ("paced", "aa", "saturated"):
            for side in ("a", "b"):
                _check_figures(both[load][side])
            assert math.isfinite(both[load]["added_p50_ms"])
        for side in ("a", "b"):  # paced: together they offer what one paced run offers
            assert both["paced"][side]["rps"] < 0.6 * capacity, (side, both["paced"][side]["rps"], capacity)
    bars = {(b["bar"], b["model"]) for b in doc["bars"]}
    for model in MODELS:
        assert ("tuned >= 90% of the limit", model) in bars
        assert ("router REST throughput within 10% of direct", model) in bars
        assert ("router REST adds under 1 ms at p50, half load (ms)", model) in bars
        assert ("router REST adds under 1 ms at p50, side by side, half load (ms)", model) in bars
        assert ("router REST adds under 1 ms at p50, side by side, saturated (ms)", model) in bars


def test_markdown_and_plots(smoke_run: Path) -> None:
    text = (smoke_run / "docs" / "benchmarks.md").read_text()
    assert text.startswith("# Speed benchmarks")
    for heading in ("## How to reproduce", "## Checks against the bars", "## text-embedder",
                    "## image-classifier", "## Memory", "## Discussion"):
        assert heading in text
    assert "TorchServe + toolkit, tuned" in text and "through the router (REST)" in text
    assert "Where the CPU goes" in text
    assert "added latency below saturation" in text
    assert "side by side" in text and "A/A" in text
    assert "python" in text  # names the load generator it fell back to
    for model in MODELS:
        png = smoke_run / "docs" / f"bench_{model}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](bench_{model}.png)" in text
