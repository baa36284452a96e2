"""What the workers and the control plane agree on, and nothing else: torch-free on purpose.

The workers (handlers/lifecycle.py, handlers/handover.py) write reports and watch for flags in
a folder per version; the control plane (tsfleet/control: recycle, apply, swap, status, up)
reads the reports and drops the flags. Both import this module, so the control plane never
loads a handler module (and torch) to learn a file name.

In ``version_folder(report_dir, model, version)``:
- ``<pid>.json``: the worker's report (requests served, when it started, RSS, CUDA memory);
- ``<pid>.retire``: dropped by the recycler, the worker hands over to a fresh process;
- ``<pid>.state``: written while ``drain`` exists (apply is about to unregister the version).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

DRAIN_FLAG = "drain"


def default_report_dir() -> Path:
    """Where workers report unless the version's ``report_dir`` setting says otherwise."""
    return Path(tempfile.gettempdir()) / "tsfleet-workers"


def version_folder(report_dir: Path, model: str, version: str) -> Path:
    """The folder of one version's reports and flags."""
    return Path(report_dir) / model / version


def report_path(folder: Path, pid: int) -> Path:
    """A worker's report."""
    return folder / f"{pid}.json"


def retire_path(folder: Path, pid: int) -> Path:
    """The flag that asks a worker to hand over to a fresh process."""
    return folder / f"{pid}.retire"


def state_path(folder: Path, pid: int) -> Path:
    """A draining worker's idle state and request count."""
    return folder / f"{pid}.state"


def pid_alive(pid: int) -> bool:
    """Whether a process exists (someone else's counts)."""
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
