"""Archives are reproducible, skipped when up to date, and indexed."""
from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import yaml

from tsfleet.build.archive import Builder, write_zip
from tsfleet.manifest import parse_fleet

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "artifacts"


def small_fleet():
    doc = copy.deepcopy(yaml.safe_load((ROOT / "fleet.yaml").read_text()))
    doc["models"] = {"image-classifier": doc["models"]["image-classifier"]}
    doc["workflows"] = {}
    return parse_fleet(doc, ROOT)


def test_same_inputs_give_the_same_archive_bytes(tmp_path: Path) -> None:
    fleet = small_fleet()
    first = Builder(fleet, tmp_path / "a", CACHE, progress=lambda line: None).build_all()
    second = Builder(fleet, tmp_path / "b", CACHE, progress=lambda line: None).build_all()
    assert [b.sha256 for b in first] == [b.sha256 for b in second]
    assert (tmp_path / "a/image-classifier-1.0.mar").read_bytes() == (tmp_path / "b/image-classifier-1.0.mar").read_bytes()
    with zipfile.ZipFile(tmp_path / "a/image-classifier-1.0.mar") as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
        config = yaml.safe_load(zf.read("model-config.yaml"))
    assert {"image_classifier.py", "shape_cnn.pt", "handlers/base.py", "model-config.yaml"} <= set(names)
    assert manifest["model"]["modelVersion"] == "1.0" and manifest["model"]["handler"] == "image_classifier.py"
    assert config["batchSize"] == 8 and config["handler"]["top_k"] == 3


def test_second_build_skips_and_index_lists_what_was_built(tmp_path: Path) -> None:
    fleet = small_fleet()
    lines: list[str] = []
    Builder(fleet, tmp_path, CACHE, progress=lambda line: None).build_all()
    again = Builder(fleet, tmp_path, CACHE, progress=lines.append).build_all()
    assert [b.rebuilt for b in again] == [False]
    assert any("up to date" in line for line in lines)
    index = json.loads((tmp_path / "index.json").read_text())
    assert index[0]["name"] == "image-classifier" and index[0]["version"] == "1.0"
    assert len(index[0]["sha256"]) == 64


def test_a_tampered_archive_is_rebuilt(tmp_path: Path) -> None:
    fleet = small_fleet()
    Builder(fleet, tmp_path, CACHE, progress=lambda line: None).build_all()
    (tmp_path / "image-classifier-1.0.mar").write_bytes(b"garbage")
    rebuilt = Builder(fleet, tmp_path, CACHE, progress=lambda line: None).build_all()
    assert rebuilt[0].rebuilt and zipfile.is_zipfile(tmp_path / "image-classifier-1.0.mar")


def test_write_zip_pins_times_and_created_on(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "MAR-INF").mkdir(parents=True)
    (src / "MAR-INF/MANIFEST.json").write_text(json.dumps({"createdOn": "25/11/2026 12:00:00", "model": {}}))
    (src / "b.txt").write_text("b")
    (src / "a.txt").write_text("a")
    write_zip(src, tmp_path / "x.zip")
    with zipfile.ZipFile(tmp_path / "x.zip") as zf:
        assert zf.namelist() == ["MAR-INF/MANIFEST.json", "a.txt", "b.txt"]
        assert {i.date_time for i in zf.infolist()} == {(1980, 1, 1, 0, 0, 0)}
        assert json.loads(zf.read("MAR-INF/MANIFEST.json"))["createdOn"] == "01/01/1980 00:00:00"
