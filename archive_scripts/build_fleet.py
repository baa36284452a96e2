#!/usr/bin/env python3
"""Build every model version and workflow of a fleet manifest into model_store/.

    python archive_scripts/build_fleet.py [--manifest fleet.yaml] [--model-store model_store]

Same as `tsfleet build`; kept here so the archive step can run on its own (e.g. in a CI job
that only packages). Archives are reproducible and skipped when their inputs are unchanged.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tsfleet.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main([*sys.argv[1:], "build"]))
