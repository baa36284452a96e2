"""Readiness by model: has each model a worker ready on a version its traffic goes to?

``/readyz`` says TorchServe answers. A pod, or a load balancer's member, that should take no
traffic while one of its models cannot be served (its archive broke, its GPU memory ran
out, its workers keep dying) asks ``/readyz?models=all``, or names the models it needs;
gRPC names one model as the health service. The answer comes from TorchServe's management
API (the management key is read, and renewed, like the CLI's), looked at once per
``CACHE_S`` however many probes ask.

``?models=all`` also waits for the manifest's workflows to be registered: ``up`` (and a pod's
TorchServe container) registers them only once every model has a worker, so without this a
pod could join its Service and answer /wfpredict with 404 for a few seconds.

A model is ready when one of the versions its traffic goes to (the weighted arms, or
TorchServe's default when it has none) has a worker READY: the router retries a request
that found no worker on the model's other arm, so a candidate without workers costs
clients nothing but it does not make the pod unready. The shadow is not counted.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence
from urllib.parse import urlsplit

from tsfleet.errors import ApiError, FleetError, NotFound
from tsfleet.build.properties import Endpoints

if TYPE_CHECKING:
    from tsfleet.control.client import ManagementClient, VersionState
    from tsfleet.router.keys import InferenceKeys
    from tsfleet.router.policy.routing import RoutingTable

CACHE_S = 1.0  # probes from several kubelets and load balancers share one look a second
TIMEOUT_S = 2.0  # of each management call: a kubelet's probe waits 1 s by default


@dataclass(frozen=True)
class ModelsReady:
    """What one look found, for the models asked about."""

    ready: bool
    versions: dict[str, dict[str, int]]  # model -> {TorchServe version its traffic goes to: workers READY}
    problems: list[str]  # one line per model (or workflow) that is not ready
    workflows: dict[str, bool] | None = None  # when asked: each manifest workflow -> registered


@dataclass(frozen=True)
class Look:
    """One look at TorchServe: each model's versions (or why not), the registered workflows (or why not)."""

    models: dict[str, list[VersionState] | str]
    workflows: list[str] | str


class ModelReadiness:
    """Answers "are these models ready?" from the routing table and TorchServe's management API."""

    def __init__(self, table: RoutingTable, keys: InferenceKeys | None, workflows: Sequence[str] = ()):
        self.table = table
        self.keys = keys  # TorchServe's key file and management address come with it
        self.workflows = list(workflows)  # the manifest's, which ?models=all waits for too
        self._client: ManagementClient | None = None
        self._look: asyncio.Future | None = None
        self._seen: tuple[float, Look] | None = None

    def unknown(self, models: list[str]) -> list[str]:
        return [m for m in models if m not in self.table.routes]

    async def check(self, models: list[str], workflows: bool = False) -> ModelsReady:
        """Whether each of ``models`` (names the table routes) has a worker ready where its
        traffic goes; with ``workflows``, and whether the manifest's workflows are registered."""
        if self.keys is None:
            return ModelsReady(False, {}, ["the router was started without TorchServe's key file (--key-file), "
                                           "so it cannot ask TorchServe which versions have workers"])
        look = await self._described(models)
        seen = look.models
        versions: dict[str, dict[str, int]] = {}
        problems = []
        for model in models:
            described = seen.get(model, "not registered in TorchServe")
            if model not in self.table.routes:  # apply took it out of the manifest meanwhile
                described = "no longer in the manifest"
            if isinstance(described, str):
                versions[model] = {}
                problems.append(f"{model}: {described}")
                continue
            ready = {v.version: v.ready_workers for v in described}
            targets = self._targets(model, described)
            versions[model] = {v: ready.get(v, 0) for v in targets}
            if not any(versions[model].values()):
                problems.append(f"{model}: no worker ready on " + ", ".join(
                    f"{v} ({'not registered' if v not in ready else '0 ready'})" for v in targets) if targets
                    else f"{model}: TorchServe has no default version for it")
        registered = None
        if workflows and self.workflows:
            if isinstance(look.workflows, str):
                problems.append(f"workflows: {look.workflows}")
                registered = dict.fromkeys(self.workflows, False)
            else:
                registered = {name: name in look.workflows for name in self.workflows}
                problems += [f"workflow {name}: not registered in TorchServe" for name, ok in registered.items() if not ok]
        return ModelsReady(not problems, versions, problems, registered)

    def _targets(self, model: str, described: list[VersionState]) -> list[str]:
        """The TorchServe versions ``model``'s traffic goes to now."""
        arms = self.table.routes[model].arms()
        if arms:
            return [self.table.upstream(model, version) or version for version, _ in arms]
        return [v.version for v in described if v.is_default]  # no route: TorchServe picks its default

    async def _described(self, models: list[str]) -> Look:
        now = time.monotonic()
        # A model routed since the last look (apply added it) is looked at now, not in a second.
        if self._seen is not None and now - self._seen[0] < CACHE_S and all(m in self._seen[1].models for m in models):
            return self._seen[1]
        if self._look is None:  # one look at a time; probes arriving meanwhile wait for it
            self._look = asyncio.ensure_future(asyncio.to_thread(self._describe_all, list(self.table.routes)))
            self._look.add_done_callback(self._looked)
        return await asyncio.shield(self._look)

    def _looked(self, look: asyncio.Future) -> None:
        self._look = None
        if not look.cancelled() and look.exception() is None:
            self._seen = (time.monotonic(), look.result())

    def _describe_all(self, models: list[str]) -> Look:
        """Each model's versions as TorchServe describes them, and the registered workflows,
        or why they could not be read (blocking)."""
        if self._client is None:
            from tsfleet.control.client import ManagementClient  # requests: only for a router whose probes ask

            assert self.keys is not None
            url = urlsplit(self.keys.management_url)
            self._client = ManagementClient(Endpoints(host=url.hostname or "127.0.0.1", management=url.port or 80),
                                            Path(self.keys.key_file), timeout=TIMEOUT_S)
        out: dict[str, list[VersionState] | str] = {}
        for model in models:
            try:
                out[model] = self._client.describe(model, retry=False)
            except NotFound:
                out[model] = "not registered in TorchServe"
            except ApiError as exc:
                out[model] = str(exc)
            except (OSError, ValueError, KeyError, TypeError) as exc:  # requests' own errors are OSErrors
                out[model] = f"describing it failed: {exc!r}"
            except FleetError as exc:  # TorchServe away, its key file unreadable: the same for every model
                return Look({m: out.get(m, str(exc)) for m in models}, str(exc))
        flows: list[str] | str = []
        if self.workflows:
            try:
                flows = self._client.list_workflows()
            except (FleetError, OSError, ValueError, KeyError, TypeError) as exc:
                flows = f"listing them failed: {exc}"
        return Look(out, flows)
