"""What docs/benchmarks.md says of its compile + bf16 rows, by the CPU that ran them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.speed.report import discussion

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("native, said", [(False, True), (True, False), (None, False)])
def test_compile_bf16_rows_say_when_the_cpu_emulates_bf16(native: bool | None, said: bool) -> None:
    # On a CPU without AVX512-BF16 or AMX the compiled bf16 rows trailed fp32 by 4-7x (bf16
    # autocast emulated: 220 against 30 ms a MiniLM batch): a reader must not take that for compile.
    doc = json.loads((ROOT / "benchmarks" / "results" / "latest.json").read_text())
    doc["meta"]["cpu_native_bf16"] = native
    text = "\n".join(discussion(doc, []))
    assert ("**This CPU has no native bf16**" in text) is said
