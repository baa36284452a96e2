"""Editing fleet.yaml's default version in place, comments kept."""
from __future__ import annotations

from pathlib import Path

import pytest

from tsfleet.errors import ManifestError
from tsfleet.manifest import load_fleet
from tsfleet.manifest_edit import set_default_version

ROOT = Path(__file__).resolve().parents[2]


def copy_manifest(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text((ROOT / "fleet.yaml").read_text().replace("handlers/", str(ROOT / "handlers") + "/"))
    return path


def test_promoted_version_becomes_the_default_and_nothing_else_changes(tmp_path: Path) -> None:
    path = copy_manifest(tmp_path)
    before = path.read_text().splitlines()
    assert set_default_version(path, "intent-classifier", "1.1") is True
    after = path.read_text().splitlines()
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 1
    assert changed[0][1].strip() == 'default_version: "1.1"'
    fleet = load_fleet(path)
    assert fleet.models["intent-classifier"].default_version == "1.1"
    assert fleet.models["text-embedder"].default_version == "1.0"
    assert set_default_version(path, "intent-classifier", "1.1") is False


def test_a_version_the_manifest_lacks_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    path = copy_manifest(tmp_path)
    before = path.read_text()
    with pytest.raises(ManifestError, match="3.0 is not one of"):
        set_default_version(path, "intent-classifier", "3.0")
    with pytest.raises(ManifestError, match="cannot find the block of model ghost"):
        set_default_version(path, "ghost", "1.0")
    assert path.read_text() == before
