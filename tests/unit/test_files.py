"""Files the fleet rewrites (router state and keys, the manifest, archives' index) are replaced
in one step, and a private one stays private whatever a crash left behind."""
from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from tsfleet.errors import StorageError
from tsfleet.files import TMP_PREFIX, replacing, write_atomically


def test_a_file_is_replaced_whole_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    path = tmp_path / "router_state.json"
    path.write_text("old")
    write_atomically(path, '{"new": true}')
    assert path.read_text() == '{"new": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router_state.json"]


def test_a_private_file_is_owner_only_from_its_first_byte(tmp_path: Path) -> None:
    path = tmp_path / "router_key.json"
    path.write_text("old")
    os.chmod(path, 0o644)  # a key file someone opened up must not stay open after a rotation
    with replacing(path, private=True) as tmp:
        # The temporary file is what a crash would leave behind.
        assert tmp.name.startswith(TMP_PREFIX) and stat.S_IMODE(tmp.stat().st_mode) == 0o600
        tmp.write_bytes(b'{"admin": "a"}')
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b'{"admin": "a"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router_key.json"]


def test_a_replaced_file_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("old")
    os.chmod(path, 0o640)
    write_atomically(path, "new")
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and path.read_text() == "new"


def test_a_failed_write_leaves_the_file_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "model.mar"
    path.write_bytes(b"previous archive")
    with pytest.raises(RuntimeError), replacing(path) as tmp:
        tmp.write_bytes(b"half an arch")
        raise RuntimeError("the archiver failed")
    assert path.read_bytes() == b"previous archive"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.mar"]


def test_a_file_that_cannot_be_written_is_named_with_the_cause(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")
    path = tmp_path / "not-a-dir" / "router_state.json"
    with pytest.raises(StorageError, match=f"cannot write {path}: Not a directory; router_state.json is as it was"):
        write_atomically(path, "{}")


def test_two_writers_of_one_file_never_leave_it_torn_or_mixed(tmp_path: Path) -> None:
    # Two processes of a router (or two CLI calls) may save the same file at once. Each
    # write must land whole: a reader sees one writer's bytes or the other's, never a mix,
    # and neither writer fails. Large payloads keep each write in the kernel long enough
    # for the two to overlap.
    path = tmp_path / "router_state.json"
    payloads = (b"a" * (1 << 20), b"b" * ((1 << 20) + 7))
    write_atomically(path, payloads[0])
    errors: list[str] = []
    writing = threading.Event()

    def writer(data: bytes) -> None:
        writing.wait()
        try:
            for _ in range(40):
                write_atomically(path, data)
        except Exception as exc:  # noqa: BLE001 - reported below, with the reader's findings
            errors.append(f"writer failed: {exc!r}")

    threads = [threading.Thread(target=writer, args=(data,)) for data in payloads]
    for thread in threads:
        thread.start()
    writing.set()
    reads = 0
    while any(thread.is_alive() for thread in threads) or reads == 0:
        data = path.read_bytes()
        reads += 1
        if data not in payloads:
            errors.append(f"read {len(data)} bytes, starting {data[:8]!r}, ending {data[-8:]!r}: neither write")
    for thread in threads:
        thread.join()
    assert not errors, errors[:5]
    assert path.read_bytes() in payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router_state.json"]
