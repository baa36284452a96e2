"""Shared test setup: the repo root on sys.path, offline model loading, and each test's tier.

A test's tier is the folder it lives in (FOLDER_TIERS), so ``-m <tier>`` selects that folder
without anyone remembering a mark. A test may also carry a tier's mark explicitly where it
belongs to that tier from another folder: the benchmark smoke runs and the live monitoring
checks in tests/k8s start a real TorchServe and are marked ``integration``; the property tier
in tests/integration is marked ``reliability``; tests/integration/test_gpu_serving.py ``gpu``.
``unit`` is the folder only: ``make test-fast`` (``-m unit``) must never start TorchServe; the
fixtures that do (tests/fleet_fixtures.py) fail a unit test that asks for them.
tests/unit/test_tiers.py checks every tier's selection against this.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The real TorchServe and router fixtures, shared by tests/integration and tests/reliability:
# loaded once here, so a run of both folders starts one server (tests/fleet_fixtures.py).
pytest_plugins = ["tests.fleet_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
FOLDER_TIERS = {
    "unit": "unit",
    "integration": "integration",
    "reliability": "reliability",
    "gpu": "gpu",
    "k8s": "k8s",
    "benchmarks": "bench",
}
sys.path.insert(0, str(ROOT))
# Nothing may come from a model hub: the reference models load from installed packages.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# The property tier's budgets: CI runs a fixed, derandomized one (the same examples every
# run, so a red CI is a real regression); `make fuzz` runs the long one with fresh seeds.
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("long", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("TSFLEET_HYPOTHESIS_PROFILE", "ci"))


def folder_tier(path: Path) -> str | None:
    """The tier of a test file: its first folder under tests/ (None outside them)."""
    try:
        first = Path(path).resolve().relative_to(TESTS).parts[0]
    except (ValueError, IndexError):
        return None
    return FOLDER_TIERS.get(first)


# A module's ``pytestmark`` applies to the tests of that module only; in a conftest it is
# ignored, so a folder's tier is given here. tryfirst: ``-m`` deselects in pytest's own
# pytest_collection_modifyitems, which has to see these marks.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        tier = folder_tier(item.path)
        if tier is not None:
            item.add_marker(tier)
