"""The routes document: what a routes file (on Kubernetes, a key of the routes ConfigMap)
holds, checked and edited with no I/O, so that the router watching it (router/routes_file.py),
the router recording a rollback in it (router/rollback_record.py) and
``tsfleet rollout --kube`` (tsfleet/k8s/rollout.py) agree on one format.

The format is ``RoutingTable.state()``'s::

    {"routes": {"intent-classifier": {"baseline": "1.0", "weights": {"1.0": 90, "1.1": 10},
                                      "shadow": null, "shadow_share": 0, "rolled_back": null}}}

A model the document leaves out keeps the route its router has. ``baseline`` and
``weights`` are needed; ``shadow``, ``shadow_share`` and ``rolled_back`` are optional (absent:
none). ``aliases`` is taken and ignored: an alias points a version at a stand-in that one
TorchServe serves during a settings swap, so it stays each router's own.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from typing import Any, Collection, Mapping

ROUTE_KEYS = ("baseline", "weights", "shadow", "shadow_share", "rolled_back", "aliases")
# A state file (router_state.json) says which routes file it last took; a copy of one is a
# routes document too.
TOP_KEYS = ("routes", "routes_file")
MAX_BYTES = 1 << 20  # a ConfigMap holds at most 1 MiB


def digest(data: bytes) -> str:
    """What a router records of a routes file's content (hex sha256)."""
    return hashlib.sha256(data).hexdigest()


def dumps(doc: dict[str, Any]) -> str:
    """A routes document as it is written: sorted and indented, so a diff reads well."""
    return json.dumps(doc, indent=2, sort_keys=True) + "\n"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _version(model: str, what: str, value: Any, known: Collection[str]) -> str:
    if not isinstance(value, str) or value not in known:
        raise ValueError(f"{model}: {what} {value!r} is not a version of the manifest ({', '.join(sorted(known))})")
    return value


def check_route(model: str, route: Any, known: Collection[str]) -> dict[str, Any]:
    """One model's entry, normalised (weights as floats, optional keys filled), or
    ValueError naming the model and what is wrong."""
    if not isinstance(route, dict):
        raise ValueError(f"{model}: expected an object with baseline and weights")
    unknown = sorted(set(route) - set(ROUTE_KEYS))
    if unknown:
        raise ValueError(f"{model}: unknown key(s) {', '.join(unknown)} (known: {', '.join(ROUTE_KEYS)})")
    if "baseline" not in route or "weights" not in route:
        raise ValueError(f"{model}: baseline and weights are needed")
    baseline = _version(model, "baseline", route["baseline"], known)
    weights = route["weights"]
    if not isinstance(weights, dict) or not weights:
        raise ValueError(f"{model}: weights must map versions to numbers")
    for version, weight in weights.items():
        _version(model, "weight for version", version, known)
        if not _number(weight) or not 0 <= weight <= 100:
            raise ValueError(f"{model}: weight of {version} is {weight!r}, not a number between 0 and 100")
    if not any(w > 0 for w in weights.values()):
        raise ValueError(f"{model}: every weight is 0; at least one version must take traffic")
    shadow, share = route.get("shadow"), route.get("shadow_share", 0.0)
    if shadow is not None:
        _version(model, "shadow", shadow, known)
    if not _number(share) or not 0 <= share <= 1:
        raise ValueError(f"{model}: shadow_share is {share!r}, not a number between 0 and 1")
    rolled_back = route.get("rolled_back")
    if rolled_back is not None and not (isinstance(rolled_back, dict) and isinstance(rolled_back.get("version"), str)
                                        and isinstance(rolled_back.get("reason"), str)):
        raise ValueError(f"{model}: rolled_back must be null or {{\"version\", \"reason\", \"at\"}}")
    aliases = route.get("aliases", {})
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise ValueError(f"{model}: aliases must map version strings to version strings")
    return {"baseline": baseline, "weights": {str(v): float(w) for v, w in weights.items()},
            "shadow": shadow, "shadow_share": float(share) if shadow is not None else 0.0,
            "rolled_back": rolled_back}


def check_routes(doc: Any, versions: Mapping[str, Collection[str]]) -> dict[str, dict[str, Any]]:
    """Each model's checked entry (``check_route``) of ``doc``, whose models and versions must
    be ``versions``' (model -> the manifest's versions); else ValueError saying what is wrong."""
    if not isinstance(doc, dict) or not isinstance(doc.get("routes"), dict):
        raise ValueError('expected {"routes": {model: {"baseline": ..., "weights": {...}}}}')
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise ValueError(f"unknown top-level key(s) {', '.join(unknown)} (only \"routes\")")
    checked = {}
    for model, route in doc["routes"].items():
        if model not in versions:
            raise ValueError(f"unknown model {model!r} (models: {', '.join(sorted(versions))})")
        checked[model] = check_route(model, route, versions[model])
    return checked


def parse(data: bytes | str, versions: Mapping[str, Collection[str]]) -> dict[str, dict[str, Any]]:
    """``check_routes`` of a file's bytes; ValueError for anything that is not a good document."""
    if len(data) > MAX_BYTES:
        raise ValueError(f"{len(data)} bytes, over the {MAX_BYTES} a ConfigMap holds")
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"not JSON ({exc})") from None
    return check_routes(doc, versions)


def entry(state_route: dict[str, Any]) -> dict[str, Any]:
    """A router's route (an entry of ``RoutingTable.state()``) as a routes document holds it."""
    return {k: copy.deepcopy(v) for k, v in state_route.items() if k in ROUTE_KEYS and k != "aliases"}


def with_rollback(doc: dict[str, Any], model: str, version: str, event: dict[str, Any],
                  current: dict[str, Any]) -> dict[str, Any]:
    """``doc`` with ``version`` of ``model`` at weight 0 and the rollback ``event`` recorded,
    as ``RoutingTable.roll_back`` does; ``current`` (the router's route) stands in for a
    model the document does not name. The rest of ``doc`` is left as it is."""
    new = copy.deepcopy(doc) if isinstance(doc.get("routes"), dict) else {"routes": {}}
    route = new["routes"].get(model)
    if not isinstance(route, dict) or not isinstance(route.get("weights"), dict):
        route = new["routes"][model] = entry(current)
    route["weights"][version] = 0.0
    if not any(_number(w) and w > 0 for w in route["weights"].values()):
        route["weights"][route.get("baseline", current["baseline"])] = 100.0
    route["rolled_back"] = dict(event)
    return new


def with_weights(doc: dict[str, Any], model: str, default: str, weights: dict[str, float],
                 baseline: str | None = None) -> dict[str, Any]:
    """``doc`` with ``model``'s weights set (a person decided: its rollback event is cleared);
    a model the document does not name starts from all traffic on ``default``."""
    new = copy.deepcopy(doc)
    route = new.setdefault("routes", {}).setdefault(model, {"baseline": default, "weights": {default: 100.0}})
    route["weights"] = {str(v): float(w) for v, w in weights.items()}
    if baseline:
        route["baseline"] = baseline
    route["rolled_back"] = None
    return new


def with_candidates_off(doc: dict[str, Any], model: str, default: str, reason: str = "rolled back by hand",
                        now: float | None = None) -> dict[str, Any]:
    """``doc`` with every candidate of ``model`` at weight 0 and the baseline at 100, as the
    admin API's rollback does."""
    new = copy.deepcopy(doc)
    route = new.setdefault("routes", {}).setdefault(model, {"baseline": default, "weights": {default: 100.0}})
    baseline = route.setdefault("baseline", default)
    candidates = sorted(v for v, w in route.get("weights", {}).items() if v != baseline and _number(w) and w > 0)
    route["weights"] = {**{v: float(w) for v, w in route.get("weights", {}).items()},
                        **{v: 0.0 for v in candidates}, baseline: 100.0}
    if candidates:
        route["rolled_back"] = {"version": candidates[-1], "reason": reason, "at": time.time() if now is None else now}
    return new
