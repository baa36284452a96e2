"""The fleet as the rest of the toolkit uses it: plain frozen dataclasses, every value merged
(defaults -> model -> version) and checked. ``tsfleet.manifest.document`` reads fleet.yaml
into these; nothing here imports pydantic, so a process that only passes a Fleet around (a
router front) does not load it."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from tsfleet.router.wire.limits import DEFAULT_LIMITS, RouterLimits


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
        """The most workers TorchServe may scale this version to."""
        return self.max_workers or self.workers


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
        """Whether any limit is on."""
        return any((self.max_requests, self.max_age_s, self.max_rss_mb, self.max_gpu_memory_mb))


@dataclass(frozen=True)
class VersionSpec:
    """One model version: how it is built (recipe, params) and served (serving, settings)."""

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
        """The .mar file this version is built into."""
        return f"{self.model}-{self.version}.mar"


@dataclass(frozen=True)
class ModelSpec:
    """A model: its versions and the one clients get without naming a version."""

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
    """A TorchServe workflow: model versions chained, served from one .war."""

    name: str
    steps: tuple[VersionSpec, ...]
    serving: Serving

    @property
    def archive_name(self) -> str:
        """The .war file this workflow is built into."""
        return f"{self.name}.war"


@dataclass(frozen=True)
class Fleet:
    """Every model version and workflow of a manifest; ``root`` is where its relative paths start."""

    root: Path
    models: dict[str, ModelSpec]
    workflows: dict[str, WorkflowSpec] = field(default_factory=dict)
    # The router's front-door limits (``router.limits``; tsfleet/router/wire/limits.py).
    router_limits: RouterLimits = DEFAULT_LIMITS

    def versions(self) -> list[VersionSpec]:
        """Every model version, model by model."""
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
