"""The manifests agree with the project: the ConfigMaps are the repo's config.properties and
fleet.yaml, every container's command line is one the real parsers accept, and ports and
probes are the router's own. Read with the project's loaders, not by hand."""
from __future__ import annotations

import argparse
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tsfleet import cli, pod
from tsfleet.manifest import load_fleet
from tsfleet.properties import Endpoints, read_properties, render_properties
from tsfleet.router.app import RouterConfig
from tsfleet.router.fronts import health
from tsfleet.router.policy.manifest_routes import routes_from_fleet
from tsfleet.router.policy.routing import RoutingTable
from tsfleet.router import readiness as readiness_module
from tsfleet.router.readiness import ModelReadiness
from tests.k8s.rendered import K8S, OVERLAYS, ROOT, container, mounts, one, overlay, pod_spec

pytestmark = pytest.mark.k8s

FILES = {"config.properties": "tsfleet-torchserve-config", "fleet.yaml": "tsfleet-fleet"}


def configmap(objs: list[dict], generated: str) -> dict:
    """The ConfigMap kustomize generated as ``generated`` (its name then carries a hash)."""
    found = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith(generated + "-")]
    assert len(found) == 1, f"no single ConfigMap generated as {generated}"
    return found[0]


@pytest.fixture
def pod_files(tmp_path: Path) -> Path:
    """The pod's /opt/tsfleet as far as the parsers look: the ConfigMaps' files beside the
    image's handlers/ (fleet.yaml's handler paths are relative to its folder)."""
    objs = overlay("gpu")
    for key, generated in FILES.items():
        (tmp_path / key).write_text(configmap(objs, generated)["data"][key])
    (tmp_path / "handlers").symlink_to(ROOT / "handlers")
    return tmp_path


def on_disk(path: str, pod_files: Path) -> Path:
    return pod_files / Path(path).relative_to("/opt/tsfleet") if path.startswith("/opt/tsfleet/") else Path(path)


def parse_tsfleet(args: list[str], pod_files: Path, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """``args`` through `tsfleet`'s own parser, up to the command it would run (not run)."""
    seen: dict[str, argparse.Namespace] = {}

    def capture(args: argparse.Namespace, fleet: object) -> int:
        seen["args"] = args
        return 0

    monkeypatch.setattr(cli, "load_fleet", lambda path: load_fleet(on_disk(path, pod_files)))
    for name in ("cmd_route", "cmd_recycle"):
        monkeypatch.setattr(cli, name, capture)
    assert cli.main(args) == 0, f"tsfleet refused {args}"
    return seen["args"]


# --- the ConfigMaps -------------------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(FILES))
def test_the_copies_in_k8s_base_files_are_the_repo_s_files(key):
    copy, original = K8S / "base" / "files" / key, ROOT / key
    assert copy.read_bytes() == original.read_bytes(), (
        f"k8s/base/files/{key} differs from {key}: run `sh scripts/sync-k8s-config.sh`")


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("key", sorted(FILES))
def test_configmaps_carry_the_repo_s_files_unchanged(name, key):
    data = configmap(overlay(name), FILES[key])["data"]
    assert set(data) == {key}
    assert data[key] == (ROOT / key).read_text()


def test_the_two_configmaps_agree_on_models_and_versions(pod_files):
    """config.properties is what `tsfleet config` renders from fleet.yaml: the same models,
    versions, batching and workers, and loopback-only listeners."""
    fleet = load_fleet(pod_files / "fleet.yaml")
    config = pod_files / "config.properties"
    assert config.read_text() == render_properties(fleet)
    props = read_properties(config)
    archives = set(props["load_models"].split(","))
    assert archives == {v.archive_name for v in fleet.versions()}
    assert {m.name for m in fleet.models.values()} == {a.rsplit("-", 1)[0] for a in archives}
    for key in ("inference_address", "management_address", "metrics_address"):
        assert urlsplit(props[key]).hostname == "127.0.0.1", f"{key}: TorchServe stays on the pod's loopback"
    assert props["disable_token_authorization"] == "false"


# --- command lines ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", OVERLAYS)
def test_router_command_line_is_tsfleet_route_on_the_router_s_ports(name, pod_files, monkeypatch):
    router = container(pod_spec(overlay(name)), "router")
    assert router["command"] == ["python", "-m", "tsfleet"]
    args = parse_tsfleet(router["args"], pod_files, monkeypatch)
    defaults = RouterConfig()
    assert args.command == "route"
    assert (args.port, args.grpc_port, args.admin_port) == (defaults.port, defaults.grpc_port, defaults.admin_port)
    assert args.host == "0.0.0.0", "the kubelet's probes and the Services reach the pod's address"
    ports = {p["name"]: p["containerPort"] for p in router["ports"]}
    assert ports == {"http": args.port, "grpc": args.grpc_port, "admin": args.admin_port}
    assert int(args.processes) >= 1, "a count, not auto: auto counts the node's CPUs"
    assert args.config == "/opt/tsfleet/config.properties" and args.manifest == "/opt/tsfleet/fleet.yaml"


@pytest.mark.parametrize("name", OVERLAYS)
def test_recycler_command_line_is_tsfleet_recycle(name, pod_files, monkeypatch):
    recycler = container(pod_spec(overlay(name)), "recycler")
    assert recycler["command"] == ["python", "-m", "tsfleet"]
    args = parse_tsfleet(recycler["args"], pod_files, monkeypatch)
    assert args.command == "recycle"
    assert args.config == "/opt/tsfleet/config.properties" and args.manifest == "/opt/tsfleet/fleet.yaml"


@pytest.mark.parametrize("name", OVERLAYS)
def test_torchserve_command_line_is_tsfleet_pod(name, monkeypatch):
    spec = pod_spec(overlay(name))
    torchserve = container(spec, "torchserve")
    assert torchserve["command"] == ["python", "-m", "tsfleet.pod", "torchserve"]
    seen = {}
    monkeypatch.setattr(pod, "serve", lambda *a, **kw: seen.setdefault("serve", a) and 0)
    assert pod.main(["torchserve", *torchserve["args"]]) == 0
    config, manifest, store, workdir, timeout, _ = seen["serve"]
    assert (str(config), str(manifest)) == ("/opt/tsfleet/config.properties", "/opt/tsfleet/fleet.yaml")
    assert str(store) == "/opt/tsfleet/model_store"
    assert torchserve["workingDir"] == str(workdir), "`kubectl exec ... tsfleet status` finds key_file.json there"
    assert timeout >= 60


@pytest.mark.parametrize("name", OVERLAYS)
def test_configs_are_the_configmaps_mounted_where_the_commands_read_them(name):
    spec = pod_spec(overlay(name))
    volumes = {v["name"]: v for v in spec["volumes"]}
    for which in ("torchserve", "recycler", "router"):
        mounted = mounts(spec, which)
        for key, generated in FILES.items():
            mount = mounted[f"/opt/tsfleet/{key}"]
            assert mount["subPath"] == key and mount["readOnly"]
            assert volumes[mount["name"]]["configMap"]["name"].startswith(generated + "-")


# --- probes ------------------------------------------------------------------------------------

def test_router_probes_are_its_own_health_checks(pod_files):
    """/livez, /readyz and /readyz?models=all, on the REST port, as health.py answers them,
    each given longer than the router takes to answer one."""
    router = container(pod_spec(overlay("gpu")), "router")
    probes = {kind: router[f"{kind}Probe"]["httpGet"] for kind in ("startup", "readiness", "liveness")}
    assert {p["port"] for p in probes.values()} == {"http"}
    assert probes["liveness"]["path"] == health.LIVE
    assert probes["readiness"]["path"] == health.READY
    path, _, query = probes["startup"]["path"].partition("?")
    assert path == health.READY
    fleet = load_fleet(pod_files / "fleet.yaml")
    readiness = ModelReadiness(RoutingTable(routes_from_fleet(fleet)), None)
    assert health._models_asked(query, readiness) == sorted(fleet.models), "the query asks for every model"
    for kind in ("readiness", "liveness"):
        assert router[f"{kind}Probe"]["timeoutSeconds"] > health.PROBE_TIMEOUT_S
    # ?models=all: the ping, then a management call (readiness.TIMEOUT_S each)
    assert router["startupProbe"]["timeoutSeconds"] > health.PROBE_TIMEOUT_S + readiness_module.TIMEOUT_S


def test_torchserve_probes_ping_the_listener_config_properties_names(pod_files, monkeypatch):
    torchserve = container(pod_spec(overlay("gpu")), "torchserve")
    seen = []
    monkeypatch.setattr(pod, "ping", lambda config, timeout: seen.append((config, timeout)) or True)
    for kind in ("startup", "liveness"):
        command = torchserve[f"{kind}Probe"]["exec"]["command"]
        assert command[:3] == ["python", "-m", "tsfleet.pod"]
        assert pod.main(command[3:]) == 0
        config, timeout = seen[-1]
        assert str(config) == "/opt/tsfleet/config.properties"
        assert timeout < torchserve[f"{kind}Probe"]["timeoutSeconds"], "ping gives up before the kubelet does"
    assert "readinessProbe" not in torchserve, "the router's /readyz is the pod's readiness"
    assert Endpoints.from_properties(pod_files / "config.properties").host == "127.0.0.1"


# --- Services and the NetworkPolicy ---------------------------------------------------------------

@pytest.mark.parametrize("name", OVERLAYS)
def test_services_reach_the_router_s_named_ports(name):
    objs = overlay(name)
    spec = pod_spec(objs)
    labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(spec, "router")["ports"]}
    served = {}
    for service in (o for o in objs if o["kind"] == "Service"):
        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: no container port {port['targetPort']}"
            assert port["port"] == ports[port["targetPort"]], "the Service keeps the router's port numbers"
            served.setdefault(service["metadata"]["name"], set()).add(port["targetPort"])
    assert served == {"tsfleet": {"http", "grpc"}, "tsfleet-internal": {"admin", "http"}}
    internal = one(objs, "Service", "tsfleet-internal")
    assert internal["metadata"]["labels"]["app.kubernetes.io/component"] == "internal", \
        "k8s/monitoring's ServiceMonitor selects it by this label"


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policy_opens_only_the_inference_ports_to_clients(name):
    objs = overlay(name)
    policy = one(objs, "NetworkPolicy")["spec"]
    labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    open_rules = [r for r in policy["ingress"] if "from" not in r]
    assert [sorted(p["port"] for p in r["ports"]) for r in open_rules] == [["grpc", "http"]]
    fenced = [r for r in policy["ingress"] if "from" in r]
    assert [sorted(p["port"] for p in r["ports"]) for r in fenced] == [["admin"]]
    assert fenced[0]["from"] == [{"podSelector": {"matchLabels": {"tsfleet.io/admin-client": "true"}}}]
