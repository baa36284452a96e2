"""Recipe outputs (tsfleet/build/recipes.py ``ensure``): made once, whole, however many build at once."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from tsfleet.errors import BuildError
from tsfleet.build.recipes import STAMP, Recipe, ensure


class SlowRecipe:
    """A build that writes its two files with a pause between them, counting its runs."""

    def __init__(self) -> None:
        self.runs, self.started = 0, threading.Event()
        self.release = threading.Event()

    def build(self, out: Path, params: dict[str, Any], progress: Any, cache: Path) -> None:
        self.runs += 1
        (out / "weights.pt").write_bytes(b"w" * 1000)
        self.started.set()
        assert self.release.wait(30)  # the other builder starts meanwhile
        (out / "config.json").write_text("{}")


def test_two_builds_at_once_make_the_output_once_and_whole(tmp_path: Path) -> None:
    # Two test sessions built at once: with one fixed .partial folder, the second deleted the
    # first's mid-build, and a stamped artifact came out without its model files.
    slow = SlowRecipe()
    recipe = Recipe("slow", slow.build, inputs=())
    out, results, errors = tmp_path / "cache" / "m-1.0", [], []

    def build() -> None:
        try:
            results.append(ensure(recipe, {}, out, lambda line: None, tmp_path))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    first = threading.Thread(target=build)
    first.start()
    assert slow.started.wait(30)
    second = threading.Thread(target=build)
    second.start()
    second.join(0.5)
    assert second.is_alive()  # waiting for the first build, not building beside it
    slow.release.set()
    first.join(30)
    second.join(30)
    assert not errors and results == [out, out] and slow.runs == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([STAMP, "config.json", "weights.pt"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["m-1.0", "m-1.0.lock"]  # no partial folder left


def test_a_failed_build_leaves_the_previous_output_and_no_partial_folder(tmp_path: Path) -> None:
    out = tmp_path / "m-1.0"
    ensure(Recipe("ok", lambda o, p, g, c: (o / "a.pt").write_text("a"), inputs=()), {}, out, lambda line: None,
           tmp_path)

    def broken(o: Path, p: dict[str, Any], g: Any, c: Path) -> None:
        (o / "half.pt").write_text("h")
        raise RuntimeError("disk on fire")

    with pytest.raises(BuildError, match="recipe broken failed: disk on fire"):
        ensure(Recipe("broken", broken, inputs=()), {}, out, lambda line: None, tmp_path)
    assert (out / "a.pt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-1.0", "m-1.0.lock"]
