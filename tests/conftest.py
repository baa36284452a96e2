"""Shared test setup: the repo root on sys.path and offline model loading."""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
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
