"""The fleet manifest (fleet.yaml): typed, validated, with errors that say where.

A model has versions; each version is built by a named recipe (``tsfleet.build.recipes``) from
its ``params`` and served with ``serving`` settings (TorchServe's batching, workers and
timeouts) and handler ``settings`` (packed into the .mar's model-config.yaml). Values are
merged defaults -> model -> version.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import yaml

from tsfleet.errors import ManifestError
from tsfleet.router.wire.limits import DEFAULT_LIMITS, RouterLimits, with_values

VERSION_RE = re.compile(r"^[0-9]+(\.[0-9]+){0,3}$")
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")


@dataclass(frozen=True)
class Serving:
    """What TorchServe itself is told about a model version."""

    batch_size: int = 1
    max_batch_delay_ms: int = 100
    workers: int = 1
    max_workers: int = 0  # 0: same as workers
    response_timeout_s: int = 120

    @property
    def worker_ceiling(self) -> int:
        return self.max_workers or self.workers


SERVING_KEYS = tuple(Serving.__dataclass_fields__)


@dataclass(frozen=True)
class RecyclePolicy:
    """When the recycler replaces a worker (0 turns a limit off), like gunicorn's --max-requests."""

    max_requests: int = 0
    max_requests_jitter: int = 0  # each worker's limit is max_requests + a stable share of this
    max_age_s: int = 0
    max_rss_mb: int = 0
    max_gpu_memory_mb: int = 0

    @property
    def enabled(self) -> bool:
        return any((self.max_requests, self.max_age_s, self.max_rss_mb, self.max_gpu_memory_mb))


RECYCLE_KEYS = tuple(RecyclePolicy.__dataclass_fields__)


@dataclass(frozen=True)
class VersionSpec:
    model: str
    version: str
    handler: Path
    recipe: str
    params: dict[str, Any]
    serving: Serving
    settings: dict[str, Any]
    recycle: RecyclePolicy = RecyclePolicy()

    @property
    def archive_name(self) -> str:
        return f"{self.model}-{self.version}.mar"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    default_version: str
    versions: dict[str, VersionSpec]
    # The router's automatic rollback rule for this model (tsfleet.router.policy.routing.RollbackRule
    # fields); empty means the router's defaults.
    rollback: dict[str, float] = field(default_factory=dict)
    # Whether the handler answers gRPC StreamPredictions (sends intermediate answers); the
    # router refuses streams for models that do not, rather than let TorchServe kill a worker.
    streaming: bool = False


@dataclass(frozen=True)
class WorkflowSpec:
    name: str
    steps: tuple[VersionSpec, ...]
    serving: Serving

    @property
    def archive_name(self) -> str:
        return f"{self.name}.war"


@dataclass(frozen=True)
class Fleet:
    root: Path
    models: dict[str, ModelSpec]
    workflows: dict[str, WorkflowSpec] = field(default_factory=dict)
    # The router's front-door limits (``router.limits``; tsfleet/router/wire/limits.py).
    router_limits: RouterLimits = DEFAULT_LIMITS

    def versions(self) -> list[VersionSpec]:
        return [v for m in self.models.values() for v in m.versions.values()]

    def without(self, model: str, version: str) -> "Fleet":
        """This fleet less one version and the workflows that use it. The model's default
        falls to its newest other version; a model left with none goes too."""
        spec = self.models[model]
        versions = {v: s for v, s in spec.versions.items() if v != version}
        models = {name: m for name, m in self.models.items() if name != model}
        if versions:
            default = spec.default_version if spec.default_version in versions else \
                max(versions, key=lambda v: tuple(int(p) for p in v.split(".")))
            models[model] = replace(spec, default_version=default, versions=versions)
        flows = {name: w for name, w in self.workflows.items()
                 if not any((s.model, s.version) == (model, version) for s in w.steps)}
        return replace(self, models=models, workflows=flows)

    def without_workflow(self, name: str) -> "Fleet":
        """This fleet less one workflow."""
        return replace(self, workflows={n: w for n, w in self.workflows.items() if n != name})

    def total_workers(self) -> int:
        """Worker processes the whole fleet starts, workflow copies included."""
        models = sum(v.serving.workers for v in self.versions())
        flows = sum(w.serving.workers * len(w.steps) for w in self.workflows.values())
        return models + flows


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ManifestError(f"{where}: expected a mapping, got {type(value).__name__}")
    return {str(k): v for k, v in value.items()}


def _only(value: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise ManifestError(
            f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})"
        )


def _integers(layers: list[tuple[dict[str, Any], str]], keys: tuple[str, ...]) -> dict[str, int]:
    merged: dict[str, Any] = {}
    for layer, where in layers:
        _only(layer, keys, where)
        for key, value in layer.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ManifestError(f"{where}.{key}: expected a non-negative integer, got {value!r}")
            merged[key] = value
    return merged


def _layers(key: str, defaults: dict, model: dict, raw: dict, name: str, where: str) -> list[tuple[dict, str]]:
    return [
        (_mapping(defaults.get(key), f"defaults.{key}"), f"defaults.{key}"),
        (_mapping(model.get(key), f"models.{name}.{key}"), f"models.{name}.{key}"),
        (_mapping(raw.get(key), f"{where}.{key}"), f"{where}.{key}"),
    ]


def _serving(layers: list[tuple[dict[str, Any], str]]) -> Serving:
    serving = Serving(**_integers(layers, SERVING_KEYS))
    where = layers[-1][1]
    if serving.batch_size < 1 or serving.workers < 0 or serving.max_batch_delay_ms < 0:
        raise ManifestError(f"{where}: batch_size must be >= 1, workers and max_batch_delay_ms >= 0")
    if serving.response_timeout_s < 1:
        raise ManifestError(f"{where}: response_timeout_s must be >= 1")
    if serving.max_workers and serving.max_workers < serving.workers:
        raise ManifestError(
            f"{where}: workers ({serving.workers}) is more than max_workers ({serving.max_workers})"
        )
    return serving


def _version_spec(root: Path, name: str, version: str, model: dict, raw: Any, defaults: dict) -> VersionSpec:
    where = f"models.{name}.versions.{version}"
    if not VERSION_RE.match(version):
        raise ManifestError(f"{where}: version {version!r} must look like 1.0 or 2.1.3")
    raw = _mapping(raw, where)
    _only(raw, ("params", "serving", "settings", "recycle"), where)
    serving = _serving(_layers("serving", defaults, model, raw, name, where))
    recycle = RecyclePolicy(**_integers(_layers("recycle", defaults, model, raw, name, where), RECYCLE_KEYS))
    settings = {
        **_mapping(defaults.get("settings"), "defaults.settings"),
        **_mapping(model.get("settings"), f"models.{name}.settings"),
        **_mapping(raw.get("settings"), f"{where}.settings"),
    }
    handler = model.get("handler")
    if not isinstance(handler, str) or not handler.endswith(".py"):
        raise ManifestError(f"models.{name}.handler: expected a path to a .py file")
    if not (root / handler).is_file():
        raise ManifestError(f"models.{name}.handler: file {handler} does not exist")
    recipe = model.get("recipe")
    if not isinstance(recipe, str):
        raise ManifestError(f"models.{name}.recipe: expected a recipe name")
    return VersionSpec(name, version, root / handler, recipe,
                       _mapping(raw.get("params"), f"{where}.params"), serving, settings, recycle)


ROLLBACK_KEYS = ("window_s", "min_samples", "max_error_rate_increase", "max_p99_ratio", "min_p99_increase_ms")


def _rollback(layers: list[tuple[dict[str, Any], str]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for layer, where in layers:
        _only(layer, ROLLBACK_KEYS, where)
        for key, value in layer.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ManifestError(f"{where}.{key}: expected a non-negative number, got {value!r}")
            merged[key] = value
    return merged


def _model_spec(root: Path, name: str, raw: Any, defaults: dict) -> ModelSpec:
    where = f"models.{name}"
    if not NAME_RE.match(name):
        raise ManifestError(f"{where}: name must be lowercase letters, digits and dashes")
    raw = _mapping(raw, where)
    _only(raw, ("handler", "recipe", "default_version", "versions", "serving", "settings", "recycle",
                "rollback", "streaming"), where)
    if not isinstance(raw.get("streaming", False), bool):
        raise ManifestError(f"{where}.streaming: expected true or false")
    versions_raw = _mapping(raw.get("versions"), f"{where}.versions")
    if not versions_raw:
        raise ManifestError(f"{where}.versions: at least one version is needed")
    versions = {str(v): _version_spec(root, name, str(v), raw, spec, defaults) for v, spec in versions_raw.items()}
    default = str(raw.get("default_version", next(iter(versions))))
    if default not in versions:
        raise ManifestError(f"{where}.default_version: {default} is not one of {', '.join(versions)}")
    if versions[default].serving.workers < 1:
        raise ManifestError(f"{where}.versions.{default}.serving.workers: the default version needs a worker")
    return ModelSpec(name, default, versions, _rollback([
        (_mapping(defaults.get("rollback"), "defaults.rollback"), "defaults.rollback"),
        (_mapping(raw.get("rollback"), f"{where}.rollback"), f"{where}.rollback"),
    ]), bool(raw.get("streaming", False)))


def _workflow_spec(name: str, raw: Any, models: dict[str, ModelSpec], defaults: dict) -> WorkflowSpec:
    where = f"workflows.{name}"
    raw = _mapping(raw, where)
    _only(raw, ("steps", "serving"), where)
    steps_raw = raw.get("steps")
    if not isinstance(steps_raw, list) or len(steps_raw) < 2:
        raise ManifestError(f"{where}.steps: expected a list of at least two model@version steps")
    steps = []
    for step in steps_raw:
        model, _, version = str(step).partition("@")
        if model not in models:
            raise ManifestError(f"{where}.steps: unknown model {model!r}")
        version = version or models[model].default_version
        if version not in models[model].versions:
            raise ManifestError(f"{where}.steps: {model} has no version {version}")
        steps.append(models[model].versions[version])
    serving = _serving([
        (_mapping(defaults.get("serving"), "defaults.serving"), "defaults.serving"),
        (_mapping(raw.get("serving"), f"{where}.serving"), f"{where}.serving"),
    ])
    return WorkflowSpec(name, tuple(steps), serving)


def parse_fleet(doc: Any, root: Path) -> Fleet:
    """Validate a parsed manifest document; ``root`` is where relative paths start."""
    doc = _mapping(doc, "manifest")
    _only(doc, ("defaults", "models", "workflows", "router"), "manifest")
    defaults = _mapping(doc.get("defaults"), "defaults")
    _only(defaults, ("serving", "settings", "recycle", "rollback"), "defaults")
    models_raw = _mapping(doc.get("models"), "models")
    if not models_raw:
        raise ManifestError("models: the fleet needs at least one model")
    models = {name: _model_spec(root, name, raw, defaults) for name, raw in models_raw.items()}
    workflows = {
        name: _workflow_spec(name, raw, models, defaults)
        for name, raw in _mapping(doc.get("workflows"), "workflows").items()
    }
    clash = set(models) & set(workflows)
    if clash:
        raise ManifestError(f"workflows: {', '.join(sorted(clash))} is also a model name")
    return Fleet(root, models, workflows, _router_limits(doc.get("router")))


def _router_limits(raw: Any) -> RouterLimits:
    """``router.limits``: each key one of RouterLimits' fields, each value positive."""
    router = _mapping(raw, "router")
    _only(router, ("limits",), "router")
    try:
        return with_values(_mapping(router.get("limits"), "router.limits"), "router.limits")
    except ValueError as exc:
        raise ManifestError(str(exc)) from None


def load_fleet(path: str | Path) -> Fleet:
    """Read and validate a manifest file; ManifestError names the file and the key."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except yaml.YAMLError as exc:
        raise ManifestError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_fleet(doc, path.resolve().parent)
    except ManifestError as exc:
        raise ManifestError(f"{path}: {exc}") from None
