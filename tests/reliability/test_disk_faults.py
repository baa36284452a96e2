"""A full or read-only disk while the fleet writes its files: the router's routes
(router_state.json), its keys (router_key.json) and an archive. Each write fails with an
error that names the file and the cause, the previous file stays byte for byte, and no
temporary file is left behind.

The disk is a real one: a 256 KiB tmpfs, filled up, or remounted read-only.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Iterator

import pytest

from tests.fixtures.leaky import ROOT, leaky_manifest
from tests.prometheus_text import value
from tsfleet.build.archive import Builder
from tsfleet.errors import StorageError
from tsfleet.manifest import Fleet, parse_fleet
from tsfleet.control.recycle import Recycler
from tsfleet.router.keys import rotate_router_key, router_keys
from tsfleet.router.policy.routing import RollbackRule, Route, RoutingTable

pytestmark = pytest.mark.reliability


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip(f"mounting a tmpfs needs root; these tests run as uid {os.geteuid()}")
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command on this machine")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs", str(disk)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"`mount -t tmpfs` was refused (exit {done.returncode}): {done.stderr.strip()}")
    try:
        yield disk
    finally:
        if subprocess.run(["umount", str(disk)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], check=True)  # still busy: detach it now, freed later


def fill(disk: Path) -> None:
    """Take every free byte of ``disk``: the next write of any size fails with ENOSPC."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


def read_only(disk: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)


FAULTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "full": (fill, "disk full"),
    "read-only": (read_only, "read-only file system"),
}


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def two_arms(state: Path) -> RoutingTable:
    rule = RollbackRule(window_s=60, min_samples=20)
    return RoutingTable({"m": Route("m", "1.0", {"1.0": 50.0, "1.1": 50.0}, rollback=rule)}, state)


@pytest.mark.parametrize("fault", FAULTS)
def test_the_saved_routes_survive_a_disk_that_takes_no_more(small_disk: Path, fault: str, caplog) -> None:
    make_fault, cause = FAULTS[fault]
    state = small_disk / "router_state.json"
    table = two_arms(state)
    table.set_weights("m", {"1.0": 50, "1.1": 50})
    before = state.read_bytes()
    make_fault(small_disk)

    # An automatic rollback, decided in a request's path: the router logs that it cannot
    # save, and routes by the rollback all the same.
    with caplog.at_level(logging.ERROR, logger="tsfleet.router.policy.routing"):
        for i in range(20):
            table.record("m", "1.0", True, 0.01, now=i)
            event = table.record("m", "1.1", False, 0.01, now=i)
    assert event and table.routes["m"].weights == {"1.0": 50.0, "1.1": 0.0}
    assert all(table.choose("m").version == "1.0" for _ in range(10))
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(said) == 1, said
    assert said[0].startswith(f"router: cannot save the routes: cannot write {state}: {cause}"), said
    assert said[0].endswith("; router_state.json is as it was. They hold until the router restarts, "
                            "which starts from the saved ones"), said

    # A person's change (the admin API, `tsfleet rollout`) is refused in the same words.
    with pytest.raises(StorageError, match=f"^cannot write {re.escape(str(state))}: {cause}\\b") as refused:
        table.set_weights("m", {"1.0": 100})
    assert refused.value.http_status == 507
    # ...and taken back, whole: the rollback's weights and record live as before, routing as
    # before (one change of the admin API's, in several steps, likewise).
    assert table.routes["m"].weights == {"1.0": 50.0, "1.1": 0.0} and table.routes["m"].rolled_back
    with pytest.raises(StorageError, match=f"^cannot write {re.escape(str(state))}: {cause}\\b"):
        with table.taken_back_on_failure("m"):
            table.set_shadow("m", "1.1", 0.5)
            table.set_weights("m", {"1.0": 10, "1.1": 90})
    assert table.routes["m"].weights == {"1.0": 50.0, "1.1": 0.0} and table.routes["m"].rolled_back
    assert table.routes["m"].shadow is None
    assert all(table.choose("m").version == "1.0" for _ in range(10))

    assert state.read_bytes() == before
    assert names(small_disk) == (["filler", "router_state.json"] if fault == "full" else ["router_state.json"])
    assert two_arms(state).routes["m"].weights == {"1.0": 50.0, "1.1": 50.0}  # what a restart reads


@pytest.mark.parametrize("fault", FAULTS)
def test_a_key_rotation_the_disk_cannot_take_keeps_the_old_keys(small_disk: Path, fault: str) -> None:
    make_fault, cause = FAULTS[fault]
    keys = small_disk / "router_key.json"
    first = rotate_router_key(keys, grace_s=3600)
    before = keys.read_bytes()
    make_fault(small_disk)

    refused = f"^cannot write {re.escape(str(keys))}: {cause}\\b.*; router_key.json is as it was$"
    with pytest.raises(StorageError, match=refused):
        rotate_router_key(keys, grace_s=3600)

    assert keys.read_bytes() == before
    assert router_keys(keys)["inference"] == first["inference"]  # clients' key still taken
    assert names(small_disk) == (["filler", "router_key.json"] if fault == "full" else ["router_key.json"])


@pytest.mark.parametrize("fault", FAULTS)
def test_an_archive_build_the_disk_cannot_take_keeps_the_previous_archive(small_disk: Path, tmp_path: Path,
                                                                          fault: str) -> None:
    # The smallest archive the fleet's build makes (about 40 KB): the test model, no files of its own.
    make_fault, cause = FAULTS[fault]
    cache = tmp_path / "cache"

    def fleet(leak_kb: int):
        return parse_fleet(leaky_manifest(tmp_path / "reports", leak_kb, 1), ROOT)

    Builder(fleet(1), small_disk, cache, progress=lambda line: None).build_all()
    archive, index = small_disk / "leaky-1.0.mar", small_disk / "index.json"
    before = {path: path.read_bytes() for path in (archive, index)}
    make_fault(small_disk)

    # Another setting: another archive, which the disk cannot take.
    refused = f"^cannot write {re.escape(str(archive))}: {cause}\\b.*; leaky-1.0.mar is as it was$"
    with pytest.raises(StorageError, match=refused):
        Builder(fleet(2), small_disk, cache, progress=lambda line: None).build_all()

    assert {path: path.read_bytes() for path in before} == before
    expected = ["index.json", "leaky-1.0.mar"]
    assert names(small_disk) == (["filler", *expected] if fault == "full" else expected)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_recycle_the_disk_cannot_ask_for_fails_alone_and_the_recycler_goes_on(small_disk: Path, fault: str) -> None:
    make_fault, cause = FAULTS[fault]
    folder = small_disk / "m" / "1.0"
    folder.mkdir(parents=True)
    said: list[str] = []
    recycler = Recycler(Fleet(small_disk, {}), client=None, report_dir=small_disk, progress=said.append)
    make_fault(small_disk)

    # The retire flag the worker waits for cannot be written: nothing was asked of the worker.
    event = recycler.replace(SimpleNamespace(model="m", version="1.0"), 4242, "max_requests: served 501")

    flag = folder / "4242.retire"
    assert not event.ok and re.match(f"cannot write {re.escape(str(flag))}: {cause}\\b", event.detail), event.detail
    assert any(line.startswith("recycling m 1.0 worker 4242 FAILED: cannot write") for line in said), said
    assert names(folder) == []
    # Its record for `tsfleet status` cannot be written either; /metrics counts it all the same.
    assert any(line.startswith("recycle of m 1.0 worker 4242 not recorded: ") and cause in line.lower()
               for line in said), said
    assert value(recycler.metrics(), "tsfleet_worker_recycles_total", model="m", version="1.0", reason="max_requests",
                 outcome="failed") == 1
