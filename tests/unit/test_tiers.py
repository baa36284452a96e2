"""`pytest -m <tier>` selects what the tier says (tests/conftest.py marks each test by folder).

The whole suite is collected in a pytest of its own and every tier's marks compared with
the rule, then collected again with -m, as `make test-fast` and CI run it: a tier is its folder's tests plus those marked with it
explicitly in another folder; ``unit`` is its folder only, none of them marked
``integration``, so `make test-fast` cannot start TorchServe. A second plugin in that pytest
reads every collected test's marks before tests/conftest.py adds the folder's, which is how
an explicit mark is told from a folder's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FOLDER_TIERS, folder_tier

ROOT = Path(__file__).resolve().parents[2]
FOLDERS = {tier: folder for folder, tier in FOLDER_TIERS.items()}

pytestmark = pytest.mark.slow  # collects the whole suite twice (about 10 s each)

# Records, before any other pytest_collection_modifyitems (a wrapper runs first), each test's
# own marks, and after them all, what is left once -m has deselected, with its final marks.
PROBE = '''
import json, os
import pytest

@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(items):
    explicit = {item.nodeid: sorted({m.name for m in item.iter_markers()}) for item in items}
    result = yield
    with open(os.environ["TIER_PROBE_OUT"], "w") as out:
        json.dump({"explicit": explicit,
                   "selected": {item.nodeid: sorted({m.name for m in item.iter_markers()}) for item in items}}, out)
    return result
'''


def collect(tmp_path: Path, *args: str) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """The node ids ``pytest --collect-only -q ARGS`` prints, every collected test's explicit
    marks, and the selection with each selected test's final marks, as the probe saw them."""
    (tmp_path / "tier_probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
           "TIER_PROBE_OUT": str(tmp_path / "probe.json"),
           "TMPDIR": str(tmp_path)}  # test modules that make a temp dir on import leave it here
    # --strict-markers: a tier mark missing from pyproject.toml's list is a collection error.
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "--strict-markers",
                           "-p", "no:cacheprovider", "-p", "tier_probe", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    # -q prints one node id a line, then a blank line and the summary.
    printed = done.stdout.split("\n\n", 1)[0].splitlines()
    probe = json.loads((tmp_path / "probe.json").read_text())
    return printed, probe["explicit"], probe["selected"]


def in_folder(nodeid: str, tier: str) -> bool:
    return nodeid.startswith(f"tests/{FOLDERS[tier]}/")


def test_each_tier_marks_its_folder_and_what_is_marked_with_it_and_m_selects_by_them(tmp_path: Path) -> None:
    # Two collections of the whole suite (about 10 s each), not one per tier: the first
    # gives every test's marks before and after the folder hook, the second shows that
    # pytest's own -m filter sees them (it runs after the hook).
    printed, explicit, final = collect(tmp_path)
    assert printed == list(final) and set(final) == set(explicit)
    for tier in sorted(FOLDERS):
        marked = sorted(n for n, marks in final.items() if tier in marks)
        if tier == "unit":
            expected = sorted(n for n in explicit if in_folder(n, "unit"))
            assert not [n for n in expected if "integration" in explicit[n]]  # would start TorchServe
        else:
            expected = sorted(n for n in explicit if in_folder(n, tier) or tier in explicit[n])
        assert marked == expected, tier
        assert any(in_folder(n, tier) for n in marked), f"nothing collected from tests/{FOLDERS[tier]}"
    printed, _, selected = collect(tmp_path, "-m", "not integration")
    assert printed == list(selected)
    assert sorted(selected) == sorted(n for n, marks in final.items() if "integration" not in marks)
    assert any(in_folder(n, "unit") for n in selected) and any(in_folder(n, "k8s") for n in selected)
    assert not any(in_folder(n, "integration") for n in selected)


@pytest.mark.parametrize("folder, tier", sorted(FOLDER_TIERS.items()))
def test_a_file_s_tier_is_its_first_folder_under_tests(folder: str, tier: str) -> None:
    # Deeper folders too, and nothing outside tests/ or directly in it.
    assert folder_tier(ROOT / "tests" / folder / "test_x.py") == tier
    assert folder_tier(ROOT / "tests" / folder / "deeper" / "test_x.py") == tier
    assert folder_tier(ROOT / "tests" / "test_x.py") is None
    assert folder_tier(ROOT / "benchmarks" / folder / "test_x.py") is None
