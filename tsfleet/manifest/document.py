"""fleet.yaml as typed models: what each key may hold, and what it means.

These models are the one statement of the file's shape: ``load_fleet`` validates with them,
and ``tsfleet schema`` writes their JSON Schema (fleet.schema.json), whose descriptions an
editor shows as help. They describe the file as written, layer by layer; ``read.py`` merges
the layers into the runtime objects of ``fleet.py``. Checks that span keys a JSON Schema cannot
relate (a default version that is one of the versions) are validators here; those that need
the merged values or the file system (a handler file that exists) are in ``read.py``.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationInfo, create_model, field_validator
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from tsfleet.manifest.fleet import RecyclePolicy, Serving
from tsfleet.router.policy.routing import RollbackRule
from tsfleet.router.wire.limits import RouterLimits

NAME_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
VERSION_PATTERN = r"^[0-9]+(\.[0-9]+){0,3}$"
STEP_PATTERN = r"^[a-z][a-z0-9-]{0,62}(@[0-9]+(\.[0-9]+){0,3})?$"
HANDLER_PATTERN = r"\.py$"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Version = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]
Step = Annotated[str, StringConstraints(pattern=STEP_PATTERN)]


class Section(BaseModel):
    """A mapping of fleet.yaml: every key known, every value of its own type."""

    # strict: "8" is not 8, nor true 1 (YAML's own types are what the file means); frozen:
    # a validated document is not changed afterwards.
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _section(cls: type[Section]) -> Any:
    """An optional mapping field (YAML's empty value, null, is an empty one), with ``cls``'s
    docstring as its description: an editor shows it on the key itself."""
    return Field(None, description=" ".join((cls.__doc__ or "").split()))


def _default(cls: type, name: str) -> Any:
    """The runtime dataclass's default for ``name``: one place for each default."""
    return next(f.default for f in fields(cls) if f.name == name)


class ServingDoc(Section, title="serving"):
    """What TorchServe is told about a model version. A version's value wins over its model's,
    which wins over `defaults`."""

    batch_size: int = Field(_default(Serving, "batch_size"), ge=1,
                            description="Requests TorchServe batches into one call of the handler.")
    max_batch_delay_ms: int = Field(_default(Serving, "max_batch_delay_ms"), ge=0,
                                    description="How long TorchServe waits to fill a batch, in ms.")
    workers: int = Field(_default(Serving, "workers"), ge=0,
                         description="Worker processes per model version (the default version needs one).")
    max_workers: int = Field(_default(Serving, "max_workers"), ge=0,
                             description="The most workers TorchServe may scale to; 0: the same as workers.")
    response_timeout_s: int = Field(_default(Serving, "response_timeout_s"), ge=1,
                                    description="A worker silent this many seconds is restarted.")


class RecycleDoc(Section, title="recycle"):
    """When the recycler replaces a worker; 0 turns a limit off."""

    max_requests: int = Field(_default(RecyclePolicy, "max_requests"), ge=0,
                              description="Replace a worker after this many requests.")
    max_requests_jitter: int = Field(_default(RecyclePolicy, "max_requests_jitter"), ge=0,
                                     description="Each worker's max_requests is raised by a stable share of "
                                     "this, so that workers are not all replaced at once.")
    max_age_s: int = Field(_default(RecyclePolicy, "max_age_s"), ge=0,
                           description="Replace a worker this many seconds after it started.")
    max_rss_mb: int = Field(_default(RecyclePolicy, "max_rss_mb"), ge=0,
                            description="Replace a worker whose resident memory passes this, in MiB.")
    max_gpu_memory_mb: int = Field(_default(RecyclePolicy, "max_gpu_memory_mb"), ge=0,
                                   description="Replace a worker whose GPU memory passes this, in MiB.")


class RollbackDoc(Section, title="rollback"):
    """When the router rolls a canary back by itself: over window_s, with min_samples on both arms,
    its error rate is max_error_rate_increase above the baseline's, or its p99 is max_p99_ratio
    times the baseline's and min_p99_increase_ms more."""

    window_s: float = Field(_default(RollbackRule, "window_s"), ge=0, allow_inf_nan=False,
                            description="Seconds of traffic the comparison looks at.")
    min_samples: int = Field(_default(RollbackRule, "min_samples"), ge=0,
                             description="Requests each arm needs in the window before it is judged.")
    max_error_rate_increase: float = Field(_default(RollbackRule, "max_error_rate_increase"), ge=0,
                                           allow_inf_nan=False, description="How much higher the canary's "
                                           "error rate may be (0.05: 5 points).")
    max_p99_ratio: float = Field(_default(RollbackRule, "max_p99_ratio"), ge=0, allow_inf_nan=False,
                                 description="How many times the baseline's p99 the canary's may be; 0 turns "
                                 "the latency check off.")
    min_p99_increase_ms: float = Field(_default(RollbackRule, "min_p99_increase_ms"), ge=0, allow_inf_nan=False,
                                       description="...and by at least this many ms: a blip on a fast model "
                                       "is not a regression.")


SETTINGS_HELP = ("Handler settings, packed into the archive's model-config.yaml: those every handler takes "
                 "(amp_cuda, amp_cpu, compile, warmup_batch_sizes, cuda_cleanup_every, ...) and the handler's "
                 "own; `tsfleet build` refuses one the handler does not take. Merged key by key: a version's "
                 "wins over its model's, which wins over `defaults`.")


class VersionDoc(Section, title="version"):
    """One version of a model; what it leaves out comes from its model, then `defaults`."""

    params: dict[str, Any] | None = Field(None, description="The recipe's parameters for this version "
                                          "(each recipe says which it takes).")
    serving: ServingDoc | None = _section(ServingDoc)
    settings: dict[str, Any] | None = Field(None, description=SETTINGS_HELP)
    recycle: RecycleDoc | None = _section(RecycleDoc)


class ModelDoc(Section, title="model"):
    """A model TorchServe serves, in one or more versions."""

    handler: Annotated[str, StringConstraints(pattern=HANDLER_PATTERN)] = Field(
        description="The handler's .py file, relative to fleet.yaml's folder.")
    recipe: str = Field(description="How each version's artifacts are made (tsfleet/build/recipes.py).")
    versions: dict[Version, VersionDoc | None] = Field(
        min_length=1,
        description='The versions, by number: quoted, as "1.0" (YAML reads 1.0 unquoted as a number).')
    default_version: Version | None = Field(
        None, description="The version a request that names none gets; default: the first listed.")
    serving: ServingDoc | None = _section(ServingDoc)
    settings: dict[str, Any] | None = Field(None, description=SETTINGS_HELP)
    recycle: RecycleDoc | None = _section(RecycleDoc)
    rollback: RollbackDoc | None = _section(RollbackDoc)
    streaming: bool = Field(False, description="Whether the handler answers gRPC StreamPredictions; the "
                            "router refuses streams to a model that does not.")

    @field_validator("default_version")
    @classmethod
    def _one_of_the_versions(cls, default: str | None, info: ValidationInfo) -> str | None:
        versions = info.data.get("versions")  # absent when versions itself was refused
        if default is not None and versions is not None and default not in versions:
            raise ValueError(f"{default} is not one of {', '.join(versions)}")
        return default


class WorkflowDoc(Section, title="workflow"):
    """A TorchServe workflow: model versions chained, each step's output the next one's input."""

    steps: list[Step] = Field(min_length=2, description="model@version (or model: its default version), "
                              "in order; TorchServe loads private copies of each.")
    serving: ServingDoc | None = _section(ServingDoc)


class Defaults(Section, title="defaults"):
    """Values every model and version takes unless it gives its own."""

    serving: ServingDoc | None = _section(ServingDoc)
    settings: dict[str, Any] | None = Field(None, description=SETTINGS_HELP)
    recycle: RecycleDoc | None = _section(RecycleDoc)
    rollback: RollbackDoc | None = _section(RollbackDoc)


def _limit(f: Any) -> tuple[Any, Any]:
    """A RouterLimits field as a typed one: positive, of the field's kind, the same default."""
    meta = f.metadata
    answers = "; ".join(f"{said}: {meta[front]}" for front, said in (("rest", "REST"), ("grpc", "gRPC"))
                        if meta[front])
    number = f.type == "float"  # limits.py's annotations are strings
    return (float if number else int), Field(f.default, gt=0, allow_inf_nan=False if number else None,
                                             description=f"Protects {meta['protects']}. When it fires: {answers}.")


class _Limits(Section, title="router.limits"):
    """RouterLimitsDoc's base, for its title."""


# Built from RouterLimits' fields, so a limit added there is a key here with nothing else to change.
RouterLimitsDoc: type[Section] = create_model(  # type: ignore[call-overload]
    "RouterLimitsDoc", __base__=_Limits, __module__=__name__,
    __doc__="Per router process, each positive; the defaults suit a router on loopback or behind "
            "a load balancer. Each limit that fires is counted in the router's /metrics.",
    **{f.name: _limit(f) for f in fields(RouterLimits)})


class RouterDoc(Section, title="router"):
    """The router's front door (`tsfleet route`)."""

    limits: RouterLimitsDoc | None = _section(RouterLimitsDoc)  # type: ignore[valid-type]


class FleetDocument(Section):
    """Every model version TorchServe serves, and how (`tsfleet config` renders config.properties
    from it; `make up` builds and serves it)."""

    model_config = ConfigDict(title="fleet.yaml", json_schema_extra={
        "$schema": "https://json-schema.org/draft/2020-12/schema"})

    defaults: Defaults | None = _section(Defaults)
    models: dict[Name, ModelDoc] = Field(min_length=1, description=(
        "The models, by name: lowercase letters, digits and dashes (a letter first, at most 63), as "
        "TorchServe and the URLs take them."))
    workflows: dict[Name, WorkflowDoc] | None = Field(None, description="Workflows, by name (not a model's name).")
    router: RouterDoc | None = _section(RouterDoc)


class FleetSchema(GenerateJsonSchema):
    """pydantic's JSON Schema, with the one thing it leaves open closed: a mapping whose keys
    must match a pattern (models, versions, workflows) gets patternProperties alone, which lets
    any other key through; here such a key is refused, as load_fleet refuses it."""

    def dict_schema(self, schema: core_schema.DictSchema) -> JsonSchemaValue:
        out = super().dict_schema(schema)
        if "patternProperties" in out:
            out["additionalProperties"] = False
        return out
