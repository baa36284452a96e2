"""One change at a time per version: the recycler and apply both scale and retire workers.

A worker replacement (scale up, retire one, scale back) and a settings swap or unregister
of the same version would undo each other's scaling, so each holds an advisory lock
(``flock``) on a file in the version's report folder while it works. Both run beside the
same TorchServe and share that folder; the kernel drops the lock if a holder dies.
"""
from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

LOCK_NAME = "change.lock"
# How long apply or promote waits for a worker replacement to let go of a version.
LOCK_WAIT_S = 330.0  # a replacement's own deadline (its ready timeout, 300 s) ends before this


def report_dir_of(spec: Any, default: Path) -> Path:
    """Where a version's workers report (a manifest ``report_dir`` setting wins)."""
    return Path(spec.settings.get("report_dir") or default)


def lock_path(report_dir: Path, model: str, version: str) -> Path:
    return report_dir / model / version / LOCK_NAME


@contextmanager
def version_lock(report_dir: Path, model: str, version: str, wait_s: float = 0.0,
                 waiting: Callable[[], None] | None = None) -> Iterator[bool]:
    """Hold the version's lock inside the block; yields False if it stayed busy for ``wait_s``.

    ``waiting`` is called once if the lock is busy at first (to say what is being waited for).
    """
    path = lock_path(report_dir, model, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline, told = time.monotonic() + wait_s, False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    yield False
                    return
                if waiting and not told:
                    waiting()
                    told = True
                time.sleep(0.1)  # a poll interval; the deadline above bounds the wait
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
