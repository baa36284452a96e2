"""``tsfleet rollout ... --kube``: a canary on Kubernetes, through the routes ConfigMap.

With several replicas, one router's admin API moves one replica. Every router of the
fleet's pods follows a routes file mounted from one ConfigMap (``tsfleet route
--routes-file``, router/routes_file.py), so a rollout writes the new routes there, with
``kubectl`` and the caller's own credentials: it reads the ConfigMap, changes the model's
route in the document it holds (policy/routes_doc.py), checks the result as the routers
will, and patches it back only if nobody changed it in between (its resourceVersion; a
conflict reads it again). The kubelets then update every pod's copy and each router takes
it within a second of its copy changing.

The same subcommands as without ``--kube``, with what differs on Kubernetes:

- ``start``/``set-weight``: the version must be in ``fleet.yaml``; whether it has ready
  workers is the pods' concern (TorchServe's management API stays on each pod's loopback):
  the routers retry a request that finds none on the baseline, and roll a failing canary back.
- ``promote``: all traffic and the baseline move to the version, and ``fleet.yaml`` says
  ``default_version`` (when the file lists it); TorchServe's default in the pods follows
  when that manifest reaches their ConfigMap. Nothing is retired here: a version leaves
  with the image and manifest that no longer list it.
- ``status``: the routes as the ConfigMap holds them; traffic and latency are per replica,
  in each router's ``/metrics``.
"""
from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tsfleet.errors import FleetError, KubeError
from tsfleet.manifest import Fleet
from tsfleet.router.policy import routes_doc

TRIES = 3
KUBECTL_TIMEOUT_S = 60


@dataclass(frozen=True)
class RoutesConfigMap:
    """Key ``key`` of ConfigMap ``name`` in ``namespace``, read and written with ``kubectl``."""

    namespace: str = "tsfleet"
    name: str = "tsfleet-routes"
    key: str = "routes.json"
    kubectl: str = "kubectl"

    def __str__(self) -> str:
        return f"ConfigMap {self.namespace}/{self.name} (key {self.key})"

    def _kubectl(self, what: str, *args: str) -> str:
        try:
            done = subprocess.run([self.kubectl, "-n", self.namespace, *args], capture_output=True, text=True,
                                  timeout=KUBECTL_TIMEOUT_S)
        except FileNotFoundError:
            raise FleetError(f"{self.kubectl} not found: install kubectl or give --kubectl") from None
        except subprocess.TimeoutExpired:
            raise KubeError(what, 0, f"kubectl did not finish within {KUBECTL_TIMEOUT_S} s") from None
        if done.returncode != 0:
            err = done.stderr.strip()
            # kubectl prints the API's reason: "Error from server (Conflict): ..."
            status = next((code for reason, code in (("(Conflict)", 409), ("(NotFound)", 404), ("(Forbidden)", 403))
                           if reason in err), 0)
            raise KubeError(what, status, err or f"kubectl exited with status {done.returncode}")
        return done.stdout

    def read(self) -> tuple[dict[str, Any], str]:
        """The routes document the ConfigMap holds (empty when it has no such key yet) and the
        ConfigMap's resourceVersion."""
        try:
            found = json.loads(self._kubectl(f"get {self}", "get", "configmap", self.name, "-o", "json"))
        except KubeError as exc:
            if exc.status == 404:
                raise FleetError(f"{self} does not exist: apply the fleet's manifests (k8s/) first") from None
            raise
        text = (found.get("data") or {}).get(self.key)
        try:
            doc = json.loads(text) if text else {"routes": {}}
        except ValueError:
            raise FleetError(f"{self} does not hold JSON (the routers refuse it too); fix it with "
                             f"`kubectl -n {self.namespace} edit configmap {self.name}`") from None
        if not isinstance(doc, dict):
            raise FleetError(f"{self} does not hold a routes document; fix it with "
                             f"`kubectl -n {self.namespace} edit configmap {self.name}`")
        doc.setdefault("routes", {})
        return doc, str((found.get("metadata") or {}).get("resourceVersion", ""))

    def write(self, doc: dict[str, Any], resource_version: str) -> None:
        """Patch the key with ``doc``, only if the ConfigMap is still at ``resource_version``."""
        patch: dict[str, Any] = {"data": {self.key: routes_doc.dumps(doc)}}
        if resource_version:
            patch["metadata"] = {"resourceVersion": resource_version}
        self._kubectl(f"patch {self}", "patch", "configmap", self.name, "--type", "merge", "-p", json.dumps(patch))

    def update(self, fleet: Fleet, change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any]:
        """Read, change, check as the routers will, write; again if it changed meanwhile."""
        versions = {name: list(model.versions) for name, model in fleet.models.items()}
        for attempt in range(1, TRIES + 1):
            doc, resource_version = self.read()
            new = change(doc)
            try:
                routes_doc.check_routes(new, versions)
            except ValueError as exc:
                raise FleetError(f"the routers would refuse the new routes: {exc}") from None
            try:
                self.write(new, resource_version)
                return new
            except KubeError as exc:
                if exc.status != 409 or attempt == TRIES:
                    raise
        raise AssertionError("unreachable")


def _route(doc: dict[str, Any], fleet: Fleet, model: str | None) -> tuple[str, dict[str, Any]]:
    if not model or model not in fleet.models:
        raise FleetError(f"no model {model!r} in the manifest (models: {', '.join(sorted(fleet.models))})")
    default = fleet.models[model].default_version
    return model, doc["routes"].get(model) or {"baseline": default, "weights": {default: 100.0}}


def _weights(route: dict[str, Any]) -> str:
    return ", ".join(f"{v} {w:.0f}%" for v, w in sorted(route["weights"].items()))


def status(where: RoutesConfigMap, fleet: Fleet, model: str | None = None) -> str:
    """The routes as the ConfigMap holds them, in ``tsfleet rollout status``'s table."""
    from tsfleet.control.rollout import render_status

    doc, _ = where.read()
    routes = {}
    for name in fleet.models:
        _, route = _route(doc, fleet, name)
        routes[name] = {"baseline": route["baseline"], "weights": route["weights"], "shadow": route.get("shadow"),
                        "rolled_back": route.get("rolled_back"), "arms": {}}
    return render_status(routes, model) + (f"\n(routes from {where}; requests and latency are per replica, "
                                           "in each router's /metrics)")


def run(where: RoutesConfigMap, fleet: Fleet, action: str, model: str | None, version: str | None,
        weight: float | None, say: Callable[[str], None], manifest: Path | None = None) -> None:
    """One ``tsfleet rollout`` subcommand, done on the routes ConfigMap."""
    if action == "status":
        say(status(where, fleet, model))
        return
    model, _ = _route({"routes": {}}, fleet, model)
    spec = fleet.models[model]
    if action == "rollback":
        new = where.update(fleet, lambda doc: routes_doc.with_candidates_off(doc, model, spec.default_version))
        say(f"{model}: all traffic back on {new['routes'][model]['baseline']} in {where}")
        return
    if not version:
        raise FleetError(f"rollout {action} needs MODEL VERSION")
    if version not in spec.versions:
        raise FleetError(f"{model} {version} is not in the manifest (versions: {', '.join(sorted(spec.versions))}); "
                         "the routers take only versions their fleet.yaml lists")
    if action == "promote":
        new = where.update(fleet, lambda doc: routes_doc.with_weights(doc, model, spec.default_version,
                                                                       {version: 100.0}, baseline=version))
        say(f"{model}: {version} takes all traffic and is the baseline in {where}")
        if spec.default_version != version:
            from tsfleet.manifest_edit import set_default_version

            if manifest and set_default_version(manifest, model, version):
                say(f"{model}: {manifest} now says default_version {version!r}; TorchServe's default in the pods "
                    "follows once this manifest reaches their fleet ConfigMap (k8s/README.md)")
            else:
                say(f"note: fleet.yaml still says default_version {spec.default_version!r} for {model}")
        return
    if weight is None:
        raise FleetError("set-weight needs MODEL VERSION WEIGHT")
    if not 0 <= weight <= 100:
        raise FleetError(f"weight {weight} is out of range 0..100")

    def change(doc: dict[str, Any]) -> dict[str, Any]:
        _, route = _route(doc, fleet, model)
        baseline = route.get("baseline") or spec.default_version
        if version == baseline:
            raise FleetError(f"{model} {version} is already the baseline; promote or roll back instead")
        return routes_doc.with_weights(doc, model, spec.default_version, {baseline: 100 - weight, version: weight})

    new = where.update(fleet, change)
    say(f"{model}: {_weights(new['routes'][model])} in {where}")
