"""The fleet manifest (fleet.yaml): typed, validated, with errors that say where.

A model has versions; each version is built by a named recipe (``tsfleet.build.recipes``) from
its ``params`` and served with ``serving`` settings (TorchServe's batching, workers and
timeouts) and handler ``settings`` (packed into the .mar's model-config.yaml). Values are
merged defaults -> model -> version.

``document`` holds the file's typed models (pydantic; the JSON Schema `tsfleet schema` writes),
``fleet`` the runtime objects everything else uses, ``read`` what turns one into the other.
The readers load pydantic when first called: a router front process imports this package for
the runtime types alone, and should not pay for pydantic's import and memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from tsfleet.manifest.fleet import Fleet, ModelSpec, RecyclePolicy, Serving, VersionSpec, WorkflowSpec

__all__ = ["Fleet", "ModelSpec", "RecyclePolicy", "Serving", "VersionSpec", "WorkflowSpec",
           "json_schema", "load_fleet", "parse_fleet"]


def parse_fleet(doc: Any, root: Path) -> Fleet:
    """Validate a parsed manifest document; ``root`` is where relative paths start."""
    from tsfleet.manifest import read

    return read.parse_fleet(doc, root)


def load_fleet(path: str | Path) -> Fleet:
    """Read and validate a manifest file; ManifestError names the file and the key."""
    from tsfleet.manifest import read

    return read.load_fleet(path)


def json_schema() -> str:
    """fleet.yaml's JSON Schema as text, as `tsfleet schema` writes it to fleet.schema.json."""
    from tsfleet.manifest import read

    return read.json_schema()
