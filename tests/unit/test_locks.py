"""The per-version change lock shared by the recycler and apply."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

from tests.fixtures.locking import held_elsewhere
from tsfleet.control.locks import lock_path, version_lock


def test_second_holder_is_refused_then_waits_until_release(tmp_path: Path) -> None:
    told: list[str] = []
    with version_lock(tmp_path, "m", "1.0") as first:
        assert first
        with version_lock(tmp_path, "m", "1.0") as second:
            assert not second  # no wait asked for: refused at once
        with version_lock(tmp_path, "m", "2.0") as other:
            assert other  # another version is independent
    # Held by another thread, which lets go once the waiter says it waits: it then gets it.
    waiting = threading.Event()

    def say() -> None:
        told.append("waiting")
        waiting.set()

    with held_elsewhere(tmp_path, "m", "1.0", release=waiting):
        with version_lock(tmp_path, "m", "1.0", wait_s=20, waiting=say) as got:
            assert got
    assert told == ["waiting"]


def test_a_holder_that_dies_leaves_the_version_free(tmp_path: Path) -> None:
    path = lock_path(tmp_path, "m", "1.0")
    code = ("import sys, time; from pathlib import Path; from tsfleet.control.locks import version_lock\n"
            "with version_lock(Path(sys.argv[1]), 'm', '1.0'):\n"
            "    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        assert proc.stdout.readline().strip() == "held"
        with version_lock(tmp_path, "m", "1.0") as mine:
            assert not mine
        proc.kill()
        proc.wait(10)
        with version_lock(tmp_path, "m", "1.0", wait_s=5) as mine:
            assert mine  # the kernel released the dead holder's lock
    finally:
        proc.kill()
    assert path.is_file()
