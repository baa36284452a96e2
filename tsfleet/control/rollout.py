"""`tsfleet rollout`: canary a version through the router, then promote it or roll it back.

It talks to the router's admin API (weights live there) and to TorchServe's management API
(to check a version is registered and ready, and to switch the default on promote).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from handlers.contract import default_report_dir
from tsfleet.control.client import ManagementClient
from tsfleet.control.locks import LOCK_WAIT_S, version_lock
from tsfleet.control.router_admin import RouterAdmin
from tsfleet.control.swap import RouterLink, Swapper
from tsfleet.errors import FleetError, NotFound
from tsfleet.manifest import Fleet


def _ready(client: ManagementClient, model: str, version: str) -> None:
    try:
        versions = {v.version: v for v in client.describe(model)}
    except NotFound:
        raise FleetError(f"model {model} is not registered in TorchServe") from None
    if version not in versions:
        raise FleetError(f"{model} {version} is not registered in TorchServe "
                         f"(registered: {', '.join(sorted(versions))}); add it to fleet.yaml and run tsfleet apply")
    if versions[version].ready_workers == 0:
        raise FleetError(f"{model} {version} has no ready worker; not sending it traffic")


def _route(admin: RouterAdmin, model: str) -> dict[str, Any]:
    routes = admin.routes()
    if model not in routes:
        raise FleetError(f"the router has no route for {model} (models: {', '.join(sorted(routes))})")
    return routes[model]


def set_weight(admin: RouterAdmin, client: ManagementClient, model: str, version: str, weight: float,
               fleet: Fleet | None = None) -> dict:
    """Send ``weight``% of the model's traffic to ``version`` and the rest to the baseline
    (``fleet``: the manifest, which must list ``version``)."""
    if not 0 <= weight <= 100:
        raise FleetError(f"weight {weight} is out of range 0..100")
    route = _route(admin, model)
    if version == route["baseline"]:
        raise FleetError(f"{model} {version} is already the baseline; promote or roll back instead")
    if weight > 0:
        _ready(client, model, version)
        spec = fleet.models.get(model) if fleet is not None else None
        if spec is not None and version not in spec.versions:
            raise FleetError(f"{model} {version} is registered but the manifest does not list it, so the next "
                             "tsfleet apply would retire it under the canary; add it to fleet.yaml first")
    return admin.call("PUT", f"/routes/{model}", {"weights": {route["baseline"]: 100 - weight, version: weight}})


def promote(admin: RouterAdmin, client: ManagementClient, fleet: Fleet, model: str, version: str,
            say: Callable[[str], None], manifest: Path | None = None, report_dir: Path | None = None) -> None:
    """All traffic to ``version``, make it TorchServe's default and the manifest's, and
    retire the old version (drained first) if the manifest no longer lists it."""
    from tsfleet.manifest_edit import set_default_version

    route = _route(admin, model)
    _ready(client, model, version)
    old = route["baseline"]
    admin.call("PUT", f"/routes/{model}", {"weights": {version: 100}, "baseline": version})
    client.set_default(model, version)
    say(f"{model}: {version} takes all traffic and is TorchServe's default (was {old})")
    spec = fleet.models.get(model)
    if spec and spec.default_version != version:
        if manifest and version in spec.versions and set_default_version(manifest, model, version):
            say(f"{model}: {manifest} now says default_version {version!r} (so apply keeps it)")
        else:
            say(f"note: fleet.yaml still says default_version {spec.default_version!r} for {model}; set it to "
                f"{version!r} or the next `tsfleet apply` switches the default back")
    if spec and old != version and old not in spec.versions:
        swapper = Swapper(client, fleet.root / "model_store", report_dir or default_report_dir(),
                          RouterLink(None, say), say)
        with version_lock(swapper.report_dir, model, old, LOCK_WAIT_S,
                          lambda: say(f"  waiting for the recycler to finish with {model} {old}")) as mine:
            if not mine:
                raise FleetError(f"{model} {old} stayed locked by a worker replacement for {LOCK_WAIT_S:.0f} s; "
                                 "run promote again to retire it")
            swapper.retire(model, old)
        say(f"{model}: retired {old}, which the manifest no longer lists")


def render_status(routes: dict[str, Any], model: str | None = None) -> str:
    lines = [f"{'MODEL':<20} {'VERSION':<8} {'ROLE':<9} {'WEIGHT':>6} {'REQUESTS':>9} {'ERRORS':>7} "
             f"{'P50 ms':>7} {'P99 ms':>7} {'SHADOW (req/err/disagree)':>26}"]
    for name, route in sorted(routes.items()):
        if model and name != model:
            continue
        versions = sorted(set(route["weights"]) | set(route["arms"]) | ({route["shadow"]} if route["shadow"] else set()))
        for v in versions:
            arm = route["arms"].get(v, {})
            role = "baseline" if v == route["baseline"] else ("shadow" if v == route["shadow"] else "candidate")
            shadow = (f"{arm.get('shadow_requests', 0)}/{arm.get('shadow_errors', 0)}/{arm.get('shadow_disagreements', 0)}"
                      if arm.get("shadow_requests") else "")
            # Latencies are over the rollback window: none there is "-", not a 0 ms arm.
            p50, p99 = ((f"{arm.get('p50_ms', 0):.1f}", f"{arm.get('p99_ms', 0):.1f}")
                        if arm.get("window_requests", arm.get("requests", 0)) else ("-", "-"))
            lines.append(f"{name:<20} {v:<8} {role:<9} {route['weights'].get(v, 0):>6.0f} {arm.get('requests', 0):>9} "
                         f"{arm.get('error_rate', 0):>7.1%} {p50:>7} {p99:>7} {shadow:>26}")
        if route.get("rolled_back"):
            rb = route["rolled_back"]
            lines.append(f"{'':<20} rolled back {rb['version']}: {rb['reason']}")
    return "\n".join(lines)
