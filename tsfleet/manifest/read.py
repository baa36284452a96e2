"""fleet.yaml read: validated against document.py's models, then merged into fleet.py's runtime
objects (defaults -> model -> version), with the checks that need the merged values or the
files (a handler that exists, a workflow step that names a version of the fleet)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tsfleet.errors import ManifestError
from tsfleet.manifest.document import (Defaults, FleetDocument, FleetSchema, ModelDoc, ServingDoc, VersionDoc,
                                       WorkflowDoc)
from tsfleet.manifest.fleet import Fleet, ModelSpec, RecyclePolicy, Serving, VersionSpec, WorkflowSpec
from tsfleet.manifest.messages import problems
from tsfleet.router.wire.limits import DEFAULT_LIMITS, RouterLimits

# libyaml's loader where PyYAML has it: the same documents, read several times faster.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _given(section: BaseModel | None) -> dict[str, Any]:
    """The keys a layer sets itself, so that a lower layer's value shows through the rest."""
    return section.model_dump(exclude_unset=True) if section is not None else {}


def _serving(layers: list[tuple[ServingDoc | None, str]], problems: list[str]) -> Serving:
    """One Serving from its layers, lowest first; ``layers[-1]``'s place names a problem."""
    merged: dict[str, Any] = {}
    for section, _ in layers:
        merged.update(_given(section))
    serving = Serving(**merged)
    if serving.max_workers and serving.max_workers < serving.workers:
        problems.append(f"{layers[-1][1]}: workers ({serving.workers}) is more than max_workers "
                        f"({serving.max_workers})")
    return serving


def _model(root: Path, name: str, doc: ModelDoc, defaults: Defaults, problems: list[str]) -> ModelSpec:
    """A model with every version's values merged (defaults -> model -> version)."""
    where = f"models.{name}"
    if not (root / doc.handler).is_file():
        problems.append(f"{where}.handler: file {doc.handler} does not exist")
    versions = {}
    for version, given in doc.versions.items():
        raw = given or VersionDoc()  # `"1.0":` with nothing under it
        serving = _serving([(defaults.serving, "defaults.serving"), (doc.serving, f"{where}.serving"),
                            (raw.serving, f"{where}.versions.{version}.serving")], problems)
        recycle = RecyclePolicy(**{**_given(defaults.recycle), **_given(doc.recycle), **_given(raw.recycle)})
        settings = {**(defaults.settings or {}), **(doc.settings or {}), **(raw.settings or {})}
        versions[version] = VersionSpec(name, version, root / doc.handler, doc.recipe, dict(raw.params or {}),
                                        serving, settings, recycle)
    default = doc.default_version or next(iter(versions))
    if versions[default].serving.workers < 1:
        problems.append(f"{where}.versions.{default}.serving.workers: the default version needs a worker")
    rollback = {**_given(defaults.rollback), **_given(doc.rollback)}
    return ModelSpec(name, default, versions, rollback, doc.streaming)


def _workflow(name: str, doc: WorkflowDoc, models: dict[str, ModelSpec], defaults: Defaults,
              problems: list[str]) -> WorkflowSpec:
    """A workflow, its steps resolved to the model versions they name."""
    where = f"workflows.{name}"
    if name in models:
        problems.append(f"{where}: a model has that name too (TorchServe serves both under one name)")
    steps = []
    for step in doc.steps:
        model, _, version = step.partition("@")
        if model not in models:
            problems.append(f"{where}.steps: unknown model {model!r}")
            continue
        version = version or models[model].default_version
        if version not in models[model].versions:
            problems.append(f"{where}.steps: {model} has no version {version}")
            continue
        steps.append(models[model].versions[version])
    serving = _serving([(defaults.serving, "defaults.serving"), (doc.serving, f"{where}.serving")], problems)
    return WorkflowSpec(name, tuple(steps), serving)


def validate(doc: Any) -> FleetDocument:
    """``doc`` (parsed YAML) as a FleetDocument; ManifestError, a line per problem, if it is not one."""
    try:
        # An empty file is an empty mapping, as YAML's empty values are everywhere else.
        return FleetDocument.model_validate({} if doc is None else doc)
    except ValidationError as exc:
        raise ManifestError("\n".join(problems(exc, FleetDocument))) from None


def parse_fleet(doc: Any, root: Path) -> Fleet:
    """Validate a parsed manifest document; ``root`` is where relative paths start. The file's
    shape is checked first (validate); then what needs the merged values or the files, every
    problem of either pass reported at once."""
    document = validate(doc)
    defaults = document.defaults or Defaults()
    found: list[str] = []
    models = {name: _model(root, name, spec, defaults, found) for name, spec in document.models.items()}
    workflows = {name: _workflow(name, spec, models, defaults, found)
                 for name, spec in (document.workflows or {}).items()}
    if found:
        raise ManifestError("\n".join(found))
    limits = document.router and document.router.limits
    router_limits = RouterLimits(**_given(limits)) if limits is not None else DEFAULT_LIMITS
    return Fleet(root, models, workflows, router_limits)


def in_file(path: str | Path, exc: ManifestError) -> ManifestError:
    """``exc`` with every line naming the file, as a compiler's messages do (an editor jumps to each)."""
    return ManifestError("\n".join(f"{path}: {line}" for line in str(exc).splitlines()))


def _yaml_problem(text: str, exc: yaml.YAMLError) -> yaml.YAMLError:
    """The pure-Python loader's error for ``text`` where it finds one: unlike libyaml's, its
    message shows the line, with a caret under the mistake (only a broken file pays for it)."""
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as pure:
        return pure
    return exc


def load_fleet(path: str | Path) -> Fleet:
    """Read and validate a manifest file; ManifestError names the file and the key."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    try:
        doc = yaml.load(text, Loader=_Loader)  # a safe loader, as yaml.safe_load's
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {_yaml_problem(text, exc)}") from None
    try:
        return parse_fleet(doc, path.resolve().parent)
    except ManifestError as exc:
        raise in_file(path, exc) from None


def json_schema() -> str:
    """fleet.yaml's JSON Schema, as `tsfleet schema` writes it (and fleet.schema.json holds)."""
    schema = FleetDocument.model_json_schema(schema_generator=FleetSchema)
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"
