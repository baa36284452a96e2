"""Recipes: how each model version's files are made, deterministically, from repo inputs.

A recipe writes the files a handler loads into an output folder. Its ``inputs`` (source
files, data and params) are hashed, and a folder whose stamp matches is reused, so a second
``make up`` trains nothing. To add a model, add a recipe here (or reuse one) and a handler.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tsfleet.errors import BuildError

Progress = Callable[[str], None]
ROOT = Path(__file__).resolve().parents[2]
STAMP = ".inputs.sha256"


@dataclass(frozen=True)
class Recipe:
    name: str
    build: Callable[[Path, dict[str, Any], "Progress", Path], None]
    # Repo files whose content changes what the recipe makes.
    inputs: tuple[str, ...]
    params: tuple[str, ...] = ()


def _export_minilm(out: Path, params: dict[str, Any], progress: Progress, cache: Path) -> None:
    from tsfleet.build.minilm_export import export_minilm

    progress("exporting all-MiniLM-L6-v2 weights and vocabulary")
    export_minilm(out)


def _minilm_into(out: Path, progress: Progress, cache: Path) -> None:
    shared = ensure(RECIPES["minilm"], {}, cache / "minilm", progress, cache)
    for f in sorted(shared.iterdir()):
        if f.name != STAMP:
            shutil.copyfile(f, out / f.name)


def _intent_head(out: Path, params: dict[str, Any], progress: Progress, cache: Path) -> None:
    from handlers.minilm import MiniLM
    from tsfleet.build.training.intents import load_rows, save_intent_head, train_intent_head

    _minilm_into(out, progress, cache)
    rows = load_rows(ROOT / "data/intents/train.jsonl")
    progress(f"embedding {len(rows)} training sentences with MiniLM")
    embeddings = MiniLM.load(out).embed([text for text, _ in rows])
    progress(f"training the intent head (seed {params['seed']})")
    obj = train_intent_head(embeddings, [label for _, label in rows], seed=int(params["seed"]), progress=progress)
    save_intent_head(obj, out / "intent_head.pt")


def _shape_cnn(out: Path, params: dict[str, Any], progress: Progress, cache: Path) -> None:
    from tsfleet.build.training.shapes import save_shape_cnn, train_shape_cnn

    progress(f"drawing shapes and training the CNN (seed {params['seed']}, about a minute)")
    save_shape_cnn(train_shape_cnn(seed=int(params["seed"]), progress=progress), out / "shape_cnn.pt")


def _nothing(out: Path, params: dict[str, Any], progress: Progress, cache: Path) -> None:
    """For a handler that needs no files of its own."""


RECIPES: dict[str, Recipe] = {
    "none": Recipe("none", _nothing, ()),
    "minilm": Recipe("minilm", _export_minilm, ("tsfleet/build/minilm_export.py",)),
    "intent-head": Recipe(
        "intent-head", _intent_head,
        ("tsfleet/build/minilm_export.py", "handlers/minilm.py", "handlers/intent_head.py",
         "tsfleet/build/training/__init__.py", "tsfleet/build/training/intents.py", "data/intents/train.jsonl"),
        ("seed",),
    ),
    "shape-cnn": Recipe(
        "shape-cnn", _shape_cnn,
        ("handlers/shapes.py", "tsfleet/build/training/__init__.py", "tsfleet/build/training/shapes.py"),
        ("seed",),
    ),
}


def check_params(recipe_name: str, params: dict[str, Any], where: str) -> Recipe:
    """The named recipe, after checking ``params`` fit it; BuildError-free ManifestError otherwise."""
    from tsfleet.errors import ManifestError

    if recipe_name not in RECIPES:
        raise ManifestError(f"{where}: unknown recipe {recipe_name!r} (known: {', '.join(RECIPES)})")
    recipe = RECIPES[recipe_name]
    missing = sorted(set(recipe.params) - set(params))
    extra = sorted(set(params) - set(recipe.params))
    if missing or extra:
        raise ManifestError(
            f"{where}.params: recipe {recipe_name} takes {', '.join(recipe.params) or 'no params'}"
            + (f"; missing {', '.join(missing)}" if missing else "")
            + (f"; unknown {', '.join(extra)}" if extra else "")
        )
    return recipe


def inputs_digest(recipe: Recipe, params: dict[str, Any]) -> str:
    """Hash of everything the recipe's output depends on."""
    h = hashlib.sha256(recipe.name.encode())
    h.update(json.dumps(params, sort_keys=True).encode())
    for rel in recipe.inputs:
        h.update(rel.encode())
        h.update((ROOT / rel).read_bytes())
    return h.hexdigest()


def ensure(recipe: Recipe, params: dict[str, Any], out: Path, progress: Progress, cache: Path) -> Path:
    """Make the recipe's files in ``out`` unless a matching stamp says they are there already.

    Two builds at once (two shells, two test sessions) take turns on ``out`` (a ``flock`` the
    kernel drops if a builder dies), and each works in a folder of its own: with one fixed
    ``.partial`` folder, the second deleted the first's mid-build and a stamped artifact
    came out without its model files."""
    digest = inputs_digest(recipe, params)
    stamp = out / STAMP
    if stamp.is_file() and stamp.read_text().strip() == digest:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.with_name(out.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits for a build of the same output under way
        if stamp.is_file() and stamp.read_text().strip() == digest:
            return out  # the other builder made it
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".partial-", dir=out.parent))
        try:
            try:
                recipe.build(tmp, params, progress, cache)
            except (OSError, ValueError, RuntimeError, KeyError) as exc:
                raise BuildError(f"recipe {recipe.name} failed: {exc}") from exc
            (tmp / STAMP).write_text(digest + "\n")
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed
    finally:
        os.close(fd)  # and with it the lock
    return out
