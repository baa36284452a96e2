"""A running router brought to the manifest, as ``tsfleet apply`` brings TorchServe.

The router takes its routes from the manifest when it starts and keeps its live weights in
router_state.json. A manifest changed under a running router (a model added, a version
retired, the default moved by hand) reaches TorchServe through apply; without this, the
router went on sending traffic to a version apply had just unregistered (404s), and knew no
route for a new model. apply sends ``fleet_routes`` to the admin API's ``PUT /fleet``
before it retires anything, and the router takes it with ``take_fleet``.
"""
from __future__ import annotations

import math
from typing import Any, Collection

from tsfleet.router.policy.routing import RollbackRule, Route, RoutingTable


def fleet_routes(fleet: Any, skip: Collection[tuple[str, str]] = ()) -> dict[str, dict[str, Any]]:
    """What the manifest says of each model's route, as JSON: its default version, its
    versions (less the (model, version) pairs in ``skip``: ones that did not start), its
    rollback rule and whether it streams."""
    return {name: {"default_version": model.default_version, "rollback": dict(model.rollback),
                   "streaming": model.streaming, "versions": [v for v in model.versions if (name, v) not in skip]}
            for name, model in fleet.models.items()}


def new_route(model: str, spec: dict[str, Any]) -> Route:
    """A route for a model the manifest describes as ``spec``: all traffic to its default."""
    default = spec["default_version"]
    return Route(model, default, {default: 100.0}, rollback=RollbackRule(**spec.get("rollback", {})),
                 streaming=bool(spec.get("streaming", False)), versions=tuple(spec.get("versions", ())))


def routes_from_fleet(fleet: Any) -> dict[str, Route]:
    """One route per model of the manifest: all traffic to its default version, with the
    model's rollback rule from the manifest."""
    return {model: new_route(model, spec) for model, spec in fleet_routes(fleet).items()}


def check_fleet_routes(doc: Any) -> dict[str, dict[str, Any]]:
    """``doc`` if it is what ``fleet_routes`` makes, else ValueError saying what is wrong."""
    if not isinstance(doc, dict) or not all(isinstance(m, str) and isinstance(s, dict) for m, s in doc.items()):
        raise ValueError("expected {model: {default_version, versions, rollback, streaming}}")
    # All of it is checked before take_fleet changes anything: it removes routes first, so a
    # version that failed there (a list, unhashable) used to leave routes removed behind a 400;
    # and a rollback rule of strings or NaN reached the rollback checks.
    for model, spec in doc.items():
        if not isinstance(spec.get("default_version"), str) or not isinstance(spec.get("versions"), list):
            raise ValueError(f"{model}: default_version (a string) and versions (a list) are needed")
        if not all(isinstance(v, str) and v for v in spec["versions"]) or not spec["default_version"]:
            raise ValueError(f"{model}: versions must be version strings")
        rollback = spec.get("rollback", {})
        if not isinstance(rollback, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                for v in rollback.values()):
            raise ValueError(f"{model}: rollback must map its settings to numbers of 0 or more")
        if not isinstance(spec.get("streaming", False), bool):
            raise ValueError(f"{model}: streaming must be true or false")
        try:
            RollbackRule(**rollback)
        except TypeError as exc:
            raise ValueError(f"{model}: rollback: {exc}") from None
    return doc


def take_fleet(table: RoutingTable, specs: dict[str, dict[str, Any]]) -> list[str]:
    """Bring ``table``'s routes to ``specs`` (``fleet_routes``): a new model gets a route with
    all its traffic on its default version, a model that left loses its route, weights leave
    versions that left, and a default the manifest moved takes all the traffic (a split under
    way stays while the default is its baseline). Returns what changed, a line each."""
    changes = []
    for model in [m for m in table.routes if m not in specs]:
        del table.routes[model]
        changes.append(f"{model}: route removed (the model left the manifest)")
    for model, spec in specs.items():
        default, versions = spec["default_version"], set(spec["versions"])
        route = table.routes.get(model)
        if route is None:
            if default in versions:
                table.routes[model] = new_route(model, spec)
                changes.append(f"{model}: new route, all traffic to {default}")
            continue
        fresh = new_route(model, spec)
        route.rollback, route.streaming, route.versions = fresh.rollback, fresh.streaming, fresh.versions
        kept = {v: w for v, w in route.weights.items() if v in versions}
        if (default in versions and default != route.baseline) or not any(w > 0 for w in kept.values()):
            target = default if default in versions else route.baseline
            if route.weights != {target: 100.0} or route.baseline != target:
                was = ", ".join(f"{v} {w:g}" for v, w in sorted(route.weights.items()))
                changes.append(f"{model}: all traffic to {target}, the manifest's default (was {was})")
                table.set_weights(model, {target: 100.0}, baseline=target)
        elif kept != route.weights:
            changes.append(f"{model}: weights of versions that left the manifest dropped "
                           f"({', '.join(sorted(set(route.weights) - set(kept)))})")
            table.set_weights(model, kept)
        if route.shadow and route.shadow not in versions:
            changes.append(f"{model}: shadow {route.shadow} stopped (it left the manifest)")
            table.set_shadow(model, None, 0.0)
    table.save()
    return changes


def preview(snapshot: dict[str, Any], specs: dict[str, dict[str, Any]]) -> list[str]:
    """What ``take_fleet`` would change in routes as the admin API's ``GET /routes`` shows
    them (``tsfleet plan``), changing nothing."""
    table = RoutingTable({model: Route(model, route["baseline"], dict(route["weights"]), route.get("shadow"),
                                       route.get("shadow_share", 0.0))
                          for model, route in snapshot.items()})
    return take_fleet(table, specs)
