"""Files the fleet rewrites (router state and keys, the manifest, archives' index) are replaced
in one step, and a private one stays private whatever a crash left behind."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from tsfleet.files import write_atomically


def test_a_file_is_replaced_whole_and_no_temporary_file_is_left(tmp_path: Path) -> None:
    path = tmp_path / "router_state.json"
    path.write_text("old")
    write_atomically(path, '{"new": true}')
    assert path.read_text() == '{"new": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router_state.json"]


def test_a_private_file_is_owner_only_even_over_a_crash_s_leftover(tmp_path: Path) -> None:
    path = tmp_path / "router_key.json"
    leftover = tmp_path / "router_key.json.tmp"  # a crash between the write and the rename
    leftover.write_text("half")
    os.chmod(leftover, 0o644)
    write_atomically(path, b'{"admin": "a"}', private=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b'{"admin": "a"}' and not leftover.exists()
