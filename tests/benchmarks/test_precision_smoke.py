"""benchmarks.speed.precision in a few seconds: every variant it can measure without compiling
(compiling is measured by `python -m benchmarks.speed.precision` itself), each answer set
compared with fp32's, and its report written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.speed import precision

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_precision_report_measures_and_compares_each_variant(tmp_path: Path) -> None:
    assert precision.main(["--models", "text-embedder", "image-classifier", "--variants", "fp32", "bf16", "int8",
                           "--seconds", "0.2", "--runs", "1", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "benchmarks" / "results" / "precision.json").read_text())
    text, image = (doc["models"][m]["variants"] for m in ("text-embedder", "image-classifier"))
    # fp32 is the reference: compared with itself it is exact.
    assert text["fp32"]["max_abs_deviation"] == 0 and text["fp32"]["min_cosine"] == pytest.approx(1.0)
    assert image["fp32"]["top1_agreement"] == 1.0 and text["fp32"]["top1_agreement"] is None
    # bf16 moves the answers a little, int8 more; both are measured, not assumed.
    assert 0 < text["bf16"]["max_abs_deviation"] < 0.05 and text["bf16"]["min_cosine"] > 0.999
    assert text["int8"]["max_abs_deviation"] > text["bf16"]["max_abs_deviation"]
    assert image["int8"] == {"applies": False}  # the CNN's work is in its convolutions
    for variants in (text, image):
        for name, v in variants.items():
            if v.get("applies"):
                assert v["items_per_s"] > 0 and v["x_fp32"] > 0, name
    report = (tmp_path / "docs" / "benchmarks-precision.md").read_text()
    assert "| text-embedder | int8 |" in report and "| image-classifier | int8 | does not apply |" in report


def test_fp32_must_be_among_the_variants(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        precision.main(["--variants", "bf16"])
    assert "fp32 is the reference" in capsys.readouterr().err
