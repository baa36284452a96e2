"""Build the fleet's archives: one reproducible .mar per model version, one .war per workflow.

torch-model-archiver and torch-workflow-archiver lay out each archive; this module then
writes the zip itself with sorted entries, fixed timestamps and a fixed ``createdOn`` so the
same inputs give the same bytes. ``model_store/index.json`` records what was built.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import yaml

from tsfleet.errors import BuildError
from tsfleet.files import replacing, write_atomically
from tsfleet.manifest import Fleet, VersionSpec, WorkflowSpec
from tsfleet.build.recipes import ROOT, STAMP, check_params, ensure

INDEX = "index.json"
ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
CREATED_ON = "01/01/1980 00:00:00"
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Built:
    name: str
    version: str
    kind: str  # "model" or "workflow"
    file: str
    sha256: str
    inputs: str
    rebuilt: bool


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """Hash of every file's relative path and content under ``root``."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(sha256_file(path).encode())
    return h.hexdigest()


def write_zip(src: Path, dest: Path) -> None:
    """Zip ``src`` reproducibly (sorted, fixed times, createdOn pinned), atomically: a
    build that fails (a full disk) leaves the previous archive as it was, and no partial file."""
    with replacing(dest) as tmp, zipfile.ZipFile(tmp, "w") as zf:
        for path in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = path.relative_to(src).as_posix()
            data = path.read_bytes()
            if rel in ("MAR-INF/MANIFEST.json", "WAR-INF/MANIFEST.json"):
                manifest = json.loads(data)
                manifest["createdOn"] = CREATED_ON
                data = (json.dumps(manifest, indent=4, sort_keys=True) + "\n").encode()
            info = zipfile.ZipInfo(rel, ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            # Weights barely compress; storing them keeps builds and loads fast.
            info.compress_type = zipfile.ZIP_STORED if len(data) > 1 << 20 else zipfile.ZIP_DEFLATED
            zf.writestr(info, data)


def model_config(spec: VersionSpec, fleet_workers: int) -> dict:
    """The .mar's model-config.yaml: TorchServe's keys plus the handler's settings."""
    s = spec.serving
    return {
        "minWorkers": s.workers,
        "maxWorkers": s.worker_ceiling,
        "batchSize": s.batch_size,
        "maxBatchDelay": s.max_batch_delay_ms,
        "responseTimeout": s.response_timeout_s,
        "handler": {**spec.settings, "fleet_workers": fleet_workers},
    }


def handler_class(path: Path) -> type | None:
    """The handler class a handler file defines (each defines exactly one), loaded by path."""
    import importlib.util

    loader = importlib.util.spec_from_file_location(f"_tsfleet_handler_{path.stem}", path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return next((c for c in vars(module).values()
                 if isinstance(c, type) and c.__module__ == module.__name__ and hasattr(c, "handle")), None)


def check_settings(fleet: Fleet) -> None:
    """Fail early, naming the manifest key, on handler settings the handler would refuse."""
    from handlers.config import parse_settings
    from tsfleet.errors import ManifestError

    for spec in fleet.versions():
        where = f"models.{spec.model}.versions.{spec.version}"
        check_params(spec.recipe, spec.params, where)
        cls = handler_class(spec.handler)
        options = getattr(cls, "OPTIONS", {})
        try:
            parse_settings({**spec.settings, "fleet_workers": 1}, options)
        except ValueError as exc:
            raise ManifestError(f"{where}.settings: {exc}") from None


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise BuildError(f"{what} failed:\n{proc.stdout}{proc.stderr}".rstrip())


def _tool(name: str) -> str:
    found = Path(sys.executable).with_name(name)
    return str(found) if found.exists() else name


def _stage_model(spec: VersionSpec, artifacts: Path, stage: Path, fleet_workers: int) -> None:
    pkg = stage / "extra" / "handlers"
    pkg.mkdir(parents=True)
    for src in sorted((ROOT / "handlers").glob("*.py")):
        shutil.copyfile(src, pkg / src.name)
    for f in sorted(artifacts.iterdir()):
        if f.is_file() and f.name != STAMP:
            shutil.copyfile(f, stage / "extra" / f.name)
    shutil.copyfile(spec.handler, stage / spec.handler.name)
    cfg = yaml.safe_dump(model_config(spec, fleet_workers), sort_keys=True)
    (stage / "model-config.yaml").write_text(cfg)


class Builder:
    """Builds every archive of a fleet into ``store``; ``cache`` keeps recipe outputs."""

    def __init__(self, fleet: Fleet, store: Path, cache: Path, progress: Progress = print):
        self.fleet, self.store, self.cache, self.progress = fleet, store, cache, progress
        self.index = self._read_index()

    def _read_index(self) -> dict[str, dict]:
        try:
            rows = json.loads((self.store / INDEX).read_text())
            return {row["file"]: row for row in rows}
        except (OSError, ValueError, KeyError, TypeError):
            return {}

    def _fresh(self, file: str, inputs: str) -> dict | None:
        row = self.index.get(file)
        path = self.store / file
        if row and row.get("inputs") == inputs and path.is_file() and sha256_file(path) == row["sha256"]:
            return row
        return None

    def build_all(self) -> list[Built]:
        check_settings(self.fleet)
        self.store.mkdir(parents=True, exist_ok=True)
        built = [self.build_model(spec) for spec in self.fleet.versions()]
        built += [self.build_workflow(flow) for flow in self.fleet.workflows.values()]
        rows = [{k: v for k, v in b.__dict__.items() if k != "rebuilt"} for b in built]
        write_atomically(self.store / INDEX, json.dumps(rows, indent=2) + "\n")
        return built

    def build_model(self, spec: VersionSpec) -> Built:
        recipe = check_params(spec.recipe, spec.params, f"models.{spec.model}.versions.{spec.version}")
        label = f"{spec.model} {spec.version}"
        say = lambda line: self.progress(f"[{label}] {line}")  # noqa: E731
        artifacts = ensure(recipe, spec.params, self.cache / f"{spec.model}-{spec.version}", say, self.cache)
        with tempfile.TemporaryDirectory(prefix="tsfleet-build-") as tmp:
            stage = Path(tmp) / "stage"
            _stage_model(spec, artifacts, stage, self.fleet.total_workers())
            inputs = tree_digest(stage)
            row = self._fresh(spec.archive_name, inputs)
            if row:
                say(f"up to date ({spec.archive_name})")
                return Built(**row, rebuilt=False)
            say(f"archiving {spec.archive_name}")
            out = Path(tmp) / "out"
            out.mkdir()
            # The archiver stages in $TMPDIR/<model name>; a private TMPDIR keeps builds apart.
            env = {**os.environ, "TMPDIR": tmp}
            _run([
                _tool("torch-model-archiver"), "--model-name", spec.model, "--version", spec.version,
                "--handler", str(stage / spec.handler.name), "--extra-files", str(stage / "extra"),
                "--config-file", str(stage / "model-config.yaml"), "--export-path", str(out),
                "--archive-format", "no-archive", "--force",
            ], f"torch-model-archiver for {label}", env)
            dest = self.store / spec.archive_name
            write_zip(out / spec.model, dest)
        return Built(spec.model, spec.version, "model", spec.archive_name, sha256_file(dest), inputs, True)

    def build_workflow(self, flow: WorkflowSpec) -> Built:
        s = flow.serving
        spec_doc = {
            "models": {
                "min-workers": s.workers, "max-workers": s.worker_ceiling,
                "batch-size": s.batch_size, "max-batch-delay": s.max_batch_delay_ms,
                "retry-attempts": 1, "timeout-ms": s.response_timeout_s * 1000,
                # Per node too: TorchServe otherwise applies its own delay to later nodes.
                **{step.model: {"url": step.archive_name, "batch-size": s.batch_size,
                                "max-batch-delay": s.max_batch_delay_ms} for step in flow.steps},
            },
            "dag": {a.model: [b.model] for a, b in zip(flow.steps, flow.steps[1:])},
        }
        with tempfile.TemporaryDirectory(prefix="tsfleet-build-") as tmp:
            spec_path = Path(tmp) / "workflow.yaml"
            spec_path.write_text(yaml.safe_dump(spec_doc, sort_keys=True))
            inputs = hashlib.sha256(spec_path.read_bytes()).hexdigest()
            row = self._fresh(flow.archive_name, inputs)
            if row:
                self.progress(f"[{flow.name}] up to date ({flow.archive_name})")
                return Built(**row, rebuilt=False)
            self.progress(f"[{flow.name}] archiving {flow.archive_name}")
            out = Path(tmp) / "out"
            out.mkdir()
            _run([
                _tool("torch-workflow-archiver"), "--workflow-name", flow.name,
                "--spec-file", str(spec_path), "--handler", str(ROOT / "handlers" / "workflow_nodes.py"),
                "--export-path", str(out), "--force",
            ], f"torch-workflow-archiver for {flow.name}")
            unpacked = Path(tmp) / "unpacked"
            with zipfile.ZipFile(out / flow.archive_name) as zf:
                zf.extractall(unpacked)
            dest = self.store / flow.archive_name
            write_zip(unpacked, dest)
        return Built(flow.name, "", "workflow", flow.archive_name, sha256_file(dest), inputs, True)

