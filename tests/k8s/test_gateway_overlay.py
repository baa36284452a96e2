"""k8s/overlays/gateway: the fleet as a stable and a canary Deployment, one version of the model
under test in each, with a Gateway API HTTPRoute and GRPCRoute splitting the traffic 90/10.

The Gateway API's CRD schemas are not available offline here (no package on PyPI ships them),
so HTTPRoute and GRPCRoute are held by hand to the fields of the v1 API that this overlay uses
(ROUTE_FIELDS); every other object is validated strictly, as test_render_validate.py does.
"""
from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.k8s.rendered import K8S, ROOT, container, one, overlay, run, tool
from tests.k8s.test_render_validate import CUSTOM_KINDS, VERSIONS, validate
from tsfleet.manifest import Fleet, parse_fleet
from tsfleet.build.properties import read_properties, render_properties
from tsfleet.router.policy import routes_doc

pytestmark = pytest.mark.k8s

NAME = "gateway"
FOLDER = K8S / "overlays" / NAME
README = FOLDER / "README.md"
GATEWAY_API = "gateway.networking.k8s.io/v1"
ROUTE_KINDS = {(GATEWAY_API, "HTTPRoute"), (GATEWAY_API, "GRPCRoute")}
TRACK_LABEL = "tsfleet.io/track"
STABLE, CANARY = "tsfleet", "tsfleet-canary"  # the tracks' Deployments and Services
CANARY_SHARE = 0.10
SYNC = "scripts/sync-k8s-gateway.py"
# The router's ports by name (k8s/base/deployment.yaml): REST for the HTTPRoute, gRPC for the GRPCRoute.
ROUTE_PORT_NAME = {"HTTPRoute": "http", "GRPCRoute": "grpc"}

# The fields of gateway.networking.k8s.io/v1 in the standard channel of v1.1, the first release
# with GRPCRoute in v1 (later releases only add to them), for the parts this overlay uses: keys
# outside these, or values of the wrong kind, fail the test.
ROUTE_FIELDS: dict[str, set[str]] = {
    "route": {"apiVersion", "kind", "metadata", "spec"},
    "spec": {"parentRefs", "hostnames", "rules"},
    "parentRef": {"group", "kind", "namespace", "name", "sectionName", "port"},
    "HTTPRoute.rule": {"matches", "filters", "backendRefs"},
    "GRPCRoute.rule": {"matches", "filters", "backendRefs"},
    "HTTPRoute.match": {"path", "headers", "queryParams", "method"},
    "GRPCRoute.match": {"method", "headers"},
    "path": {"type", "value"},
    "backendRef": {"group", "kind", "name", "namespace", "port", "weight", "filters"},
}
PATH_TYPES = {"Exact", "PathPrefix", "RegularExpression"}
MAX_RULES, MAX_BACKENDS, MAX_MATCHES, MAX_PARENTS = 16, 16, 64, 32
MAX_WEIGHT = 1_000_000
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def rendered() -> list[dict[str, Any]]:
    return overlay(NAME)


def deployments(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}


def route(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    return one(objs, kind)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def service_track(objs: list[dict[str, Any]], service: str) -> str:
    """The Deployment whose pods Service ``service`` selects; fails unless it is exactly one."""
    svc = one(objs, "Service", service)
    chosen = [name for name, d in deployments(objs).items()
              if selects(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"])]
    assert len(chosen) == 1, f"Service {service} selects the pods of {chosen}, not of one track"
    return chosen[0]


def track_fleet(objs: list[dict[str, Any]], deployment: str) -> Fleet:
    """The manifest a track's pods read: the data of the ConfigMap its `fleet` volume mounts,
    resolved against the repo root, which holds the image's handlers/ as /opt/tsfleet does."""
    return parse_fleet(yaml.safe_load(configmap_data(objs, deployment, "fleet")["fleet.yaml"]), ROOT)


def configmap_data(objs: list[dict[str, Any]], deployment: str, volume: str) -> dict[str, str]:
    spec = deployments(objs)[deployment]["spec"]["template"]["spec"]
    name = next(v["configMap"]["name"] for v in spec["volumes"] if v["name"] == volume)
    return one(objs, "ConfigMap", name)["data"]


def base_fleet() -> Fleet:
    return parse_fleet(yaml.safe_load((K8S / "base" / "files" / "fleet.yaml").read_text()), ROOT)


def candidate(objs: list[dict[str, Any]]) -> tuple[str, str, str]:
    """The model the tracks differ in, and its stable and canary versions."""
    stable, canary = track_fleet(objs, STABLE), track_fleet(objs, CANARY)
    differ = [m for m in stable.models if stable.models[m].versions.keys() != canary.models[m].versions.keys()]
    assert len(differ) == 1, f"the tracks must differ in one model's version, they differ in {differ}"
    model = differ[0]
    return model, stable.models[model].default_version, canary.models[model].default_version


def _path_matches(match: dict[str, Any], path: str) -> tuple[int, int] | None:
    """How well an HTTPRoute match fits ``path``, as the Gateway API ranks them (an Exact match
    first, then the longest prefix); None when it does not match."""
    rule = match.get("path", {"type": "PathPrefix", "value": "/"})
    value = rule["value"]
    if rule["type"] == "Exact":
        return (1, len(value)) if path == value else None
    if rule["type"] == "PathPrefix":
        prefix = value.rstrip("/")
        # A prefix matches whole path elements: /a/b matches /a/b and /a/b/c, not /a/bc.
        return (0, len(prefix)) if not prefix or path == prefix or path.startswith(prefix + "/") else None
    raise AssertionError(f"{rule['type']} matches are not ranked here")


def backends_for(http_route: dict[str, Any], path: str) -> dict[str, int]:
    """The Services (with their weights) a request for ``path`` goes to."""
    ranked = [(score, i) for i, rule in enumerate(http_route["spec"]["rules"])
              for m in rule.get("matches", [{}]) if (score := _path_matches(m, path)) is not None]
    assert ranked, f"no rule of the HTTPRoute matches {path}"
    _, best = max(ranked)
    return {b["name"]: b.get("weight", 1) for b in http_route["spec"]["rules"][best]["backendRefs"]}


def canary_share(backends: dict[str, int]) -> float:
    total = sum(backends.values())
    assert total > 0, f"no weight on any backend: {backends}"
    return backends.get(CANARY, 0) / total


# --- what is rendered ---------------------------------------------------------------------

def test_the_overlay_renders_two_tracks_and_their_routes():
    objs = rendered()
    assert set(deployments(objs)) == {STABLE, CANARY}
    assert {(o["apiVersion"], o["kind"]) for o in objs} >= ROUTE_KINDS
    ids = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(ids) == len(set(ids)), "an object is rendered twice"
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"tsfleet"}
    assert {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"} == {"tsfleet"}


def _without_hash(name: str) -> str:
    return re.sub(r"-[a-z0-9]{10}$", "", name)  # kustomize's content hash on generated ConfigMaps


def test_the_stable_track_is_the_gpu_overlay_and_the_canary_copies_only_what_is_per_track():
    """Everything but the routes and the canary's own objects is the gpu overlay's, by the same
    names; the canary brings a Deployment, a Service, a PDB and its two ConfigMaps, nothing
    else (a new object in the base would otherwise be copied for the canary unnoticed)."""
    objs = rendered()
    gpu = {(o["kind"], _without_hash(o["metadata"]["name"])) for o in overlay("gpu")}
    ours = {(o["kind"], _without_hash(o["metadata"]["name"])) for o in objs
            if (o["apiVersion"], o["kind"]) not in ROUTE_KINDS}
    canary = {(kind, name) for kind, name in ours if name.endswith("-canary") or "-canary-" in name}
    assert ours - canary == gpu
    assert canary == {("Deployment", CANARY), ("Service", CANARY), ("PodDisruptionBudget", CANARY),
                      ("ConfigMap", "tsfleet-fleet-canary"), ("ConfigMap", "tsfleet-torchserve-config-canary")}


@pytest.mark.parametrize("version", VERSIONS)
def test_every_core_object_is_valid_strictly(version):
    results = validate(rendered(), version)
    invalid = [r for r in results if r["result"] == "invalid"]
    assert not invalid, "\n".join(f"{r['kind']}/{r['name']}: {r['path']}: {r['message']}" for r in invalid)
    unknown = {(r["apiVersion"], r["kind"]) for r in results if r["result"] == "no-schema"}
    assert unknown <= CUSTOM_KINDS | ROUTE_KINDS, unknown
    assert ROUTE_KINDS <= unknown, "the validator knows the Gateway API now: validate the routes with it"


def test_checkov_passes_with_only_the_justified_skips(tmp_path: Path):
    """The same policy checks and skips (k8s/.checkov.yaml) as the other overlays, on both tracks."""
    target = tmp_path / "rendered.yaml"
    target.write_text(yaml.safe_dump_all(rendered()))
    done = run([tool("checkov"), "-f", target, "-o", "json", "--config-file", K8S / ".checkov.yaml"], cwd=tmp_path)
    assert done.returncode in (0, 1) and done.stdout.strip(), f"checkov did not run:\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout)
    report = report[0] if isinstance(report, list) else report
    failed = [(c["check_id"], c["resource"]) for c in report["results"]["failed_checks"]]
    assert not failed and report["summary"]["parsing_errors"] == 0, failed
    resources = {c["resource"] for c in report["results"]["passed_checks"]}
    assert {f"Deployment.tsfleet.{STABLE}", f"Deployment.tsfleet.{CANARY}"} <= resources, sorted(resources)


# --- the routes, field by field (the CRD schema is not available offline) ------------------

def _check_keys(where: str, value: Any, allowed: set[str]) -> None:
    assert isinstance(value, dict), f"{where}: expected an object, got {value!r}"
    unknown = set(value) - allowed
    assert not unknown, f"{where}: {sorted(unknown)} are not fields of the v1 API here (known: {sorted(allowed)})"


def route_errors(obj: dict[str, Any]) -> list[str]:
    """What in an HTTPRoute or GRPCRoute breaks the v1 API's rules this overlay relies on."""
    kind, errors = obj["kind"], []
    try:
        _check_keys(kind, obj, ROUTE_FIELDS["route"])
        assert obj["apiVersion"] == GATEWAY_API, f"{kind}: apiVersion {obj['apiVersion']}"
        spec = obj["spec"]
        _check_keys(f"{kind}.spec", spec, ROUTE_FIELDS["spec"])
        parents = spec["parentRefs"]
        assert isinstance(parents, list) and 1 <= len(parents) <= MAX_PARENTS, f"{kind}: parentRefs {parents!r}"
        for i, ref in enumerate(parents):
            _check_keys(f"{kind}.parentRefs[{i}]", ref, ROUTE_FIELDS["parentRef"])
            assert isinstance(ref["name"], str) and 1 <= len(ref["name"]) <= 253, ref
            assert DNS_LABEL.match(ref.get("sectionName", "a")), f"sectionName {ref.get('sectionName')!r}"
        rules = spec["rules"]
        assert isinstance(rules, list) and 1 <= len(rules) <= MAX_RULES, f"{kind}: {len(rules)} rules"
        assert sum(len(r.get("matches", [])) for r in rules) <= 128, f"{kind}: over 128 matches in all"
        for i, rule in enumerate(rules):
            where = f"{kind}.rules[{i}]"
            _check_keys(where, rule, ROUTE_FIELDS[f"{kind}.rule"])
            matches = rule.get("matches", [])
            assert isinstance(matches, list) and len(matches) <= MAX_MATCHES, f"{where}.matches"
            for j, match in enumerate(matches):
                _check_keys(f"{where}.matches[{j}]", match, ROUTE_FIELDS[f"{kind}.match"])
                if "path" in match:
                    path = match["path"]
                    _check_keys(f"{where}.matches[{j}].path", path, ROUTE_FIELDS["path"])
                    assert path.get("type", "PathPrefix") in PATH_TYPES, path
                    value = path.get("value", "/")
                    assert isinstance(value, str) and value.startswith("/") and len(value) <= 1024, path
                    assert "//" not in value and not re.search(r"/\.\.?(/|$)", value), f"{where}: {value}"
            backends = rule["backendRefs"]
            assert isinstance(backends, list) and 1 <= len(backends) <= MAX_BACKENDS, f"{where}.backendRefs"
            for j, ref in enumerate(backends):
                at = f"{where}.backendRefs[{j}]"
                _check_keys(at, ref, ROUTE_FIELDS["backendRef"])
                assert ref.get("group", "") == "" and ref.get("kind", "Service") == "Service", f"{at}: not a Service"
                assert isinstance(ref["name"], str) and DNS_LABEL.match(ref["name"]), f"{at}: name {ref['name']!r}"
                port = ref.get("port")  # required for a Service
                assert isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535, f"{at}: port"
                weight = ref.get("weight", 1)
                assert isinstance(weight, int) and not isinstance(weight, bool) and 0 <= weight <= MAX_WEIGHT, \
                    f"{at}: weight {weight!r}"
    except (AssertionError, KeyError, TypeError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    return errors


@pytest.mark.parametrize("kind", ["HTTPRoute", "GRPCRoute"])
def test_each_route_keeps_to_the_v1_api(kind):
    assert route_errors(route(rendered(), kind)) == []


@pytest.mark.parametrize("mistake", ["wieght", "weight as text", "port missing", "relative path", "v1beta2"])
def test_the_field_check_catches_a_mistake(mistake):
    """The hand check is real: each of these mistakes in the rendered HTTPRoute is reported."""
    obj = copy.deepcopy(route(rendered(), "HTTPRoute"))
    split = obj["spec"]["rules"][-1]
    if mistake == "wieght":
        split["backendRefs"][0]["wieght"] = split["backendRefs"][0].pop("weight")
    elif mistake == "weight as text":
        split["backendRefs"][0]["weight"] = "90"
    elif mistake == "port missing":
        del split["backendRefs"][1]["port"]
    elif mistake == "relative path":
        obj["spec"]["rules"][0]["matches"][0]["path"]["value"] = "predictions"
    else:
        obj["apiVersion"] = "gateway.networking.k8s.io/v1beta2"
    assert route_errors(obj)


def test_rest_and_grpc_attach_to_different_listeners_of_one_gateway():
    """An HTTPRoute and a GRPCRoute on one listener with a common hostname conflict (the
    implementation accepts only one): each names its own listener."""
    objs = rendered()
    http, grpc = (route(objs, k)["spec"]["parentRefs"] for k in ("HTTPRoute", "GRPCRoute"))
    assert {r["name"] for r in http} == {r["name"] for r in grpc}
    assert not {r.get("sectionName") for r in http} & {r.get("sectionName") for r in grpc}
    assert all(r.get("sectionName") for r in http + grpc)


# --- weights and backends ---------------------------------------------------------------

def split_rules(obj: dict[str, Any]) -> list[dict[str, int]]:
    return [{b["name"]: b.get("weight", 1) for b in r["backendRefs"]} for r in obj["spec"]["rules"]
            if len(r["backendRefs"]) > 1]


@pytest.mark.parametrize("kind", ["HTTPRoute", "GRPCRoute"])
def test_the_canary_gets_10_percent_and_the_weights_sum_to_100(kind):
    splits = split_rules(route(rendered(), kind))
    assert len(splits) == 1, f"{kind}: expected one rule that splits, found {splits}"
    weights = splits[0]
    assert set(weights) == {STABLE, CANARY}
    assert sum(weights.values()) == 100, weights
    assert canary_share(weights) == pytest.approx(CANARY_SHARE)


@pytest.mark.parametrize("kind", ["HTTPRoute", "GRPCRoute"])
def test_every_backend_is_a_track_s_service_on_its_router_port(kind):
    objs = rendered()
    for rule in route(objs, kind)["spec"]["rules"]:
        for ref in rule["backendRefs"]:
            assert ref.get("namespace", "tsfleet") == "tsfleet"
            track = service_track(objs, ref["name"])
            svc = one(objs, "Service", ref["name"])
            port = next((p for p in svc["spec"]["ports"] if p["port"] == ref["port"]), None)
            assert port is not None, f"{kind}: Service {ref['name']} has no port {ref['port']}"
            # The Service port leads to the router's own port of that name in the track's pod.
            assert port["targetPort"] == ROUTE_PORT_NAME[kind], port
            router = container(deployments(objs)[track]["spec"]["template"]["spec"], "router")
            assert ROUTE_PORT_NAME[kind] in {p["name"] for p in router["ports"]}
            if kind == "GRPCRoute":
                assert port.get("appProtocol") == "kubernetes.io/h2c", "the gateway must speak cleartext HTTP/2"
    assert {service_track(objs, s) for s in (STABLE, CANARY)} == {STABLE, CANARY}


def test_one_canary_pod_never_carries_more_than_a_stable_pod():
    objs = rendered()
    canary = deployments(objs)[CANARY]
    assert canary["spec"]["replicas"] == 1
    hpas = [o for o in objs if o["kind"] == "HorizontalPodAutoscaler"]
    assert [h["spec"]["scaleTargetRef"]["name"] for h in hpas] == [STABLE], "the canary has no HPA"
    assert "replicas" not in deployments(objs)[STABLE]["spec"], "the stable count is the HPA's"
    share = canary_share(split_rules(route(objs, "HTTPRoute"))[0])
    assert share <= (1 - share) / hpas[0]["spec"]["maxReplicas"]


# --- what each track serves -------------------------------------------------------------

def test_each_track_serves_one_version_of_each_model_and_they_differ_in_one():
    objs = rendered()
    for name in (STABLE, CANARY):
        versions = {m: sorted(s.versions) for m, s in track_fleet(objs, name).models.items()}
        assert all(len(v) == 1 for v in versions.values()), f"{name} serves {versions}"
    model, stable, canary = candidate(objs)
    assert stable != canary


def test_the_tracks_manifests_are_the_base_s_less_the_other_version():
    objs = rendered()
    model, stable, canary = candidate(objs)
    base = base_fleet()
    fix = f"run `.venv/bin/python {SYNC}` (after scripts/sync-k8s-config.sh)"
    assert track_fleet(objs, STABLE) == base.without(model, canary), f"the stable manifest is stale: {fix}"
    assert track_fleet(objs, CANARY) == base.without(model, stable), f"the canary manifest is stale: {fix}"


@pytest.mark.parametrize("deployment", [STABLE, CANARY])
def test_each_track_s_config_properties_is_the_base_s_for_its_fleet(deployment, tmp_path: Path):
    """Only the models TorchServe loads differ from the base's copy (listeners, security,
    metrics address are the base's): rendered from the track's own manifest."""
    objs = rendered()
    ours = tmp_path / "ours.properties"
    ours.write_text(configmap_data(objs, deployment, "torchserve-config")["config.properties"])
    fresh = tmp_path / "fresh.properties"
    fresh.write_text(render_properties(track_fleet(objs, deployment)))
    want = {**read_properties(K8S / "base" / "files" / "config.properties"),
            **{k: read_properties(fresh)[k] for k in ("load_models", "models")}}
    assert read_properties(ours) == want, f"stale: run `.venv/bin/python {SYNC}`"


def test_the_sync_script_finds_the_overlay_s_files_up_to_date():
    """The files are the script's output, byte for byte (so that running it again changes nothing)."""
    done = run([ROOT / ".venv" / "bin" / "python", ROOT / SYNC, "--check"], cwd=ROOT)
    assert done.returncode == 0, done.stderr + done.stdout


def test_each_deployment_is_the_gpu_overlay_s_pod():
    """Apart from its track's label, its ConfigMaps and its replica count, each Deployment is
    the gpu overlay's: the pod the other overlays' tests check, unchanged."""
    gpu = one(overlay("gpu"), "Deployment")

    def normalised(d: dict[str, Any]) -> dict[str, Any]:
        d = copy.deepcopy(d)
        d["metadata"]["name"] = "x"
        d["spec"].pop("replicas", None)
        for labels in (d["metadata"]["labels"], d["spec"]["selector"]["matchLabels"],
                       d["spec"]["template"]["metadata"]["labels"],
                       *(c["labelSelector"]["matchLabels"] for c in d["spec"]["template"]["spec"]
                         .get("topologySpreadConstraints", []))):
            labels.pop(TRACK_LABEL, None)
        for volume in d["spec"]["template"]["spec"]["volumes"]:
            if "configMap" in volume and volume["name"] in ("fleet", "torchserve-config"):
                volume["configMap"]["name"] = volume["name"]
        return d

    for name, d in deployments(rendered()).items():
        assert d["spec"]["template"]["metadata"]["labels"][TRACK_LABEL] in ("stable", "canary")
        assert normalised(d) == normalised(gpu), f"{name} differs from the gpu overlay's Deployment"


@pytest.mark.parametrize("path_of", ["version", "model", "workflow"])
def test_each_request_goes_only_to_a_track_that_serves_it(path_of):
    """REST: a path naming a version or a workflow that one track lacks goes to the other alone;
    a model both serve is split. gRPC cannot be matched by model (it is in the message), so
    every model must be served by both tracks."""
    objs = rendered()
    http = route(objs, "HTTPRoute")
    fleets = {name: track_fleet(objs, name) for name in (STABLE, CANARY)}
    serves = {service: fleets[service_track(objs, service)] for service in (STABLE, CANARY)}
    assert fleets[STABLE].models.keys() == fleets[CANARY].models.keys()
    paths: dict[str, set[str]] = {}  # path -> the Services whose track serves it
    for fleet in fleets.values():
        if path_of == "version":
            for spec in fleet.versions():
                paths[f"/predictions/{spec.model}/{spec.version}"] = {
                    s for s, f in serves.items() if spec.version in f.models[spec.model].versions}
        elif path_of == "model":
            for model in fleet.models:
                paths[f"/predictions/{model}"] = {s for s, f in serves.items() if model in f.models}
        else:
            for flow in fleet.workflows:
                paths[f"/wfpredict/{flow}"] = {s for s, f in serves.items() if flow in f.workflows}
    assert paths
    for path, servers in paths.items():
        backends = backends_for(http, path)
        assert {s for s, w in backends.items() if w > 0} <= servers, f"{path} may reach a track without it"
        if servers == {STABLE, CANARY}:
            assert canary_share(backends) == pytest.approx(CANARY_SHARE), f"{path} is not split"


def test_tsfleet_rollout_kube_does_not_apply_to_the_tracks():
    """`tsfleet rollout set-weight MODEL CANARY 10 --kube` writes a split between two versions
    into the routes ConfigMap; each track's routers serve one of the two and refuse it (they
    keep their routes), so in this overlay the weights are the HTTPRoute's and GRPCRoute's."""
    objs = rendered()
    model, stable, canary = candidate(objs)
    doc = routes_doc.with_weights({"routes": {}}, model, stable, {stable: 90.0, canary: 10.0})
    for name in (STABLE, CANARY):
        versions = {m: set(s.versions) for m, s in track_fleet(objs, name).models.items()}
        with pytest.raises(ValueError, match="is not a version of the manifest"):
            routes_doc.check_routes(doc, versions)


# --- the README's commands for moving the weights ------------------------------------------

def readme_commands(program: str) -> list[list[str]]:
    """The README's command lines that run ``program`` with ``patch`` among their words."""
    text = README.read_text().replace("\\\n", " ")
    return [words for line in text.splitlines() if line.strip().startswith(program)
            and "patch" in (words := shlex.split(line.strip()))]


def kubectl_patches() -> dict[str, list[dict[str, Any]]]:
    """The JSON patches of the README's `kubectl patch httproute|grpcroute` commands, by kind."""
    found = {}
    for words in readme_commands("kubectl"):
        kind = {"httproute": "HTTPRoute", "grpcroute": "GRPCRoute"}[words[words.index("patch") + 1]]
        assert "--type=json" in words, words
        found[kind] = json.loads(words[words.index("-p") + 1])
    return found


def kustomize_patches() -> list[dict[str, Any]]:
    """The README's `kustomize edit add patch` commands, as the entries they add to ``patches:``."""
    entries = []
    for words in readme_commands("kustomize"):
        flag = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
        entries.append({"target": {k: flag[f"--{k}"] for k in ("group", "version", "kind", "name")},
                        "patch": flag["--patch"]})
    return entries


def json_patch(obj: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902's `test` and `replace`, which the README's patches use; a failed test raises."""
    obj = copy.deepcopy(obj)
    for op in ops:
        *parents, last = [int(p) if p.isdigit() else p for p in op["path"].strip("/").split("/")]
        target = obj
        for part in parents:
            target = target[part]
        if op["op"] == "test":
            assert target[last] == op["value"], f"test {op['path']} == {op['value']!r} fails: {target[last]!r}"
        elif op["op"] == "replace":
            assert last in target or isinstance(target, list), f"replace of a missing {op['path']}"
            target[last] = op["value"]
        else:
            raise AssertionError(f"op {op['op']} is not expected in the README's patches")
    return obj


def test_the_readme_s_kubectl_patches_move_both_routes_to_the_same_share():
    patches = kubectl_patches()
    assert set(patches) == {"HTTPRoute", "GRPCRoute"}, "the README patches both routes"
    shares = set()
    objs = rendered()
    for kind, ops in patches.items():
        assert any(op["op"] == "test" for op in ops), f"{kind}: the patch checks what it replaces"
        patched = json_patch(route(objs, kind), ops)
        (weights,) = split_rules(patched)
        assert sum(weights.values()) == 100, weights
        shares.add(canary_share(weights))
        assert route_errors(patched) == []
    assert len(shares) == 1 and shares != {CANARY_SHARE}, f"the example moves both to one new share: {shares}"


def test_the_readme_s_kustomize_patches_render_what_the_kubectl_ones_do(tmp_path: Path):
    """The README's `kustomize edit add patch` entries, in a kustomization over this overlay,
    render the weights its `kubectl patch` commands set."""
    entries = kustomize_patches()
    assert {e["target"]["kind"] for e in entries} == {"HTTPRoute", "GRPCRoute"}
    kustomization = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                     # kustomize takes a folder of resources by a relative path only
                     "resources": [os.path.relpath(FOLDER, tmp_path)], "patches": entries}
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    done = run([tool("kubectl"), "kustomize", tmp_path])
    assert done.returncode == 0, done.stderr
    objs = [d for d in yaml.safe_load_all(done.stdout) if d]
    for kind, ops in kubectl_patches().items():
        assert split_rules(route(objs, kind)) == split_rules(json_patch(route(rendered(), kind), ops))
        assert route_errors(route(objs, kind)) == []
