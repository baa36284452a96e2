"""The manifests agree with the project: the ConfigMaps are the repo's config.properties and
fleet.yaml (the pod's copy binds TorchServe's metrics on the pod's address, nothing else
differs), every container's command line is one the real parsers accept, and ports and
probes are the router's own. Read with the project's loaders, not by hand."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tsfleet import cli

from tsfleet.k8s import pod

from tsfleet.k8s import rollout as rollout_kube
from tsfleet.manifest import load_fleet
from tsfleet.build.properties import Endpoints, read_properties, render_properties
from tsfleet.router.app import RouterConfig
from tsfleet.router.fronts import health
from tsfleet.router.policy.manifest_routes import routes_from_fleet
from tsfleet.router.policy.routing import RoutingTable
from tsfleet.router import readiness as readiness_module
from tsfleet.router.readiness import ModelReadiness
from tests.k8s.rendered import K8S, OVERLAYS, ROOT, arg_value, container, mounts, one, overlay, pod_spec, run

pytestmark = pytest.mark.k8s

FILES = {"config.properties": "tsfleet-torchserve-config", "fleet.yaml": "tsfleet-fleet"}
# The one line the pod's config.properties may change (scripts/sync-k8s-config.sh): TorchServe's
# metrics on every address of the pod, for Prometheus; the port stays the repo's.
POD_METRICS_HOST = "0.0.0.0"


def pod_copy(key: str, original: str) -> str:
    """What k8s/base/files/ must hold for the repo's ``key`` with content ``original``."""
    if key != "config.properties":
        return original
    lines = original.splitlines(keepends=True)
    metrics = [i for i, line in enumerate(lines) if line.startswith("metrics_address=")]
    assert len(metrics) == 1, "config.properties sets metrics_address once"
    url = urlsplit(lines[metrics[0]].split("=", 1)[1].strip())
    assert url.hostname == "127.0.0.1", "the repo's config.properties keeps TorchServe's metrics on loopback"
    lines[metrics[0]] = f"metrics_address={url.scheme}://{POD_METRICS_HOST}:{url.port}\n"
    return "".join(lines)


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
    for name in ("cmd_route", "cmd_recycle", "cmd_rollout"):
        monkeypatch.setattr(cli, name, capture)
    assert cli.main(args) == 0, f"tsfleet refused {args}"
    return seen["args"]


# --- the ConfigMaps -------------------------------------------------------------------------

@pytest.mark.parametrize("key", sorted(FILES))
def test_the_copies_in_k8s_base_files_are_the_repo_s_files(key):
    copy, original = K8S / "base" / "files" / key, ROOT / key
    assert copy.read_text() == pod_copy(key, original.read_text()), (
        f"k8s/base/files/{key} differs from {key}: run `sh scripts/sync-k8s-config.sh`")


def test_the_pod_s_config_properties_differs_in_metrics_address_alone():
    """Line for line: only metrics_address differs, and only in its host."""
    copy = (K8S / "base" / "files" / "config.properties").read_text().splitlines()
    original = (ROOT / "config.properties").read_text().splitlines()
    assert len(copy) == len(original)
    differ = [(a, b) for a, b in zip(original, copy) if a != b]
    assert [a.split("=", 1)[0] for a, _ in differ] == ["metrics_address"]
    (was, now), = differ
    was_url, now_url = urlsplit(was.split("=", 1)[1]), urlsplit(now.split("=", 1)[1])
    assert (was_url.hostname, now_url.hostname) == ("127.0.0.1", POD_METRICS_HOST)
    assert now_url.port == was_url.port and now_url.scheme == was_url.scheme


def test_the_sync_script_writes_the_copies_the_tests_expect(tmp_path):
    """scripts/sync-k8s-config.sh, run on a copy of the repo's files, writes exactly what
    k8s/base/files/ holds; it refuses a config.properties whose metrics are not on loopback."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "sync-k8s-config.sh", tmp_path / "scripts")
    for key in FILES:
        shutil.copy(ROOT / key, tmp_path / key)
    done = run(["sh", tmp_path / "scripts" / "sync-k8s-config.sh"], timeout=60)
    assert done.returncode == 0, done.stderr
    for key in FILES:
        assert (tmp_path / "k8s" / "base" / "files" / key).read_bytes() == (K8S / "base" / "files" / key).read_bytes()
    # Metrics already on another address: the script says so and leaves the old copy.
    config = tmp_path / "config.properties"
    config.write_text(config.read_text().replace("metrics_address=http://127.0.0.1:", "metrics_address=http://10.0.0.1:"))
    done = run(["sh", tmp_path / "scripts" / "sync-k8s-config.sh"], timeout=60)
    assert done.returncode != 0 and "metrics_address" in done.stderr
    assert (tmp_path / "k8s" / "base" / "files" / "config.properties").read_bytes() == \
        (K8S / "base" / "files" / "config.properties").read_bytes()


@pytest.mark.parametrize("name", OVERLAYS)
@pytest.mark.parametrize("key", sorted(FILES))
def test_configmaps_carry_the_repo_s_files_unchanged(name, key):
    data = configmap(overlay(name), FILES[key])["data"]
    assert set(data) == {key}
    assert data[key] == pod_copy(key, (ROOT / key).read_text())


def test_the_two_configmaps_agree_on_models_and_versions(pod_files):
    """config.properties is what `tsfleet config` renders from fleet.yaml: the same models,
    versions, batching and workers; inference and management on loopback, metrics on the
    pod's address for Prometheus."""
    fleet = load_fleet(pod_files / "fleet.yaml")
    config = pod_files / "config.properties"
    assert config.read_text() == pod_copy("config.properties", render_properties(fleet))
    props = read_properties(config)
    archives = set(props["load_models"].split(","))
    assert archives == {v.archive_name for v in fleet.versions()}
    assert {m.name for m in fleet.models.values()} == {a.rsplit("-", 1)[0] for a in archives}
    for key in ("inference_address", "management_address"):
        assert urlsplit(props[key]).hostname == "127.0.0.1", f"{key}: TorchServe stays on the pod's loopback"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert urlsplit(props["metrics_address"]).hostname == POD_METRICS_HOST
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
def test_router_follows_the_mounted_routes_file_and_records_rollbacks_in_its_configmap(name, pod_files, monkeypatch):
    """The router's arguments through the real `tsfleet route` (its parser and cmd_route, up to
    the server it would start): the routes file is the ConfigMap's key where the pod mounts
    it, and rollbacks go to that same ConfigMap."""
    from tsfleet.router import app

    spec = pod_spec(overlay(name))
    router = container(spec, "router")
    seen = {}
    monkeypatch.setattr(cli, "load_fleet", lambda path: load_fleet(on_disk(path, pod_files)))
    monkeypatch.setattr(app, "serve", lambda fleet, config, say: seen.setdefault("config", config))
    monkeypatch.delenv("TSFLEET_ROUTES_CONFIGMAP", raising=False)  # the flag alone must name it
    assert cli.main(router["args"]) == 0, f"tsfleet refused {router['args']}"
    config = seen["config"]
    mount = mounts(spec, "router")[str(config.routes_file.parent)]
    assert "subPath" not in mount and mount["volume"]["configMap"]["name"] == config.routes_configmap
    # rollback_record.py writes the key named as the file; `tsfleet rollout --kube` edits the
    # same ConfigMap and key by default.
    where = rollout_kube.RoutesConfigMap()
    assert (config.routes_configmap, config.routes_file.name) == (where.name, where.key)
    assert one(overlay(name), "ConfigMap", where.name)["metadata"]["namespace"] == where.namespace


def test_tsfleet_rollout_kube_defaults_are_the_manifests_routes_configmap(pod_files, monkeypatch):
    """`tsfleet rollout ... --kube` with no more flags edits what the pods mount."""
    args = parse_tsfleet(["rollout", "status", "--kube"], pod_files, monkeypatch)
    objs = overlay("cpu")
    router = container(pod_spec(objs), "router")
    assert args.configmap == arg_value(router["args"], "--routes-configmap")
    assert args.configmap_key == arg_value(router["args"], "--routes-file").rpartition("/")[2]
    assert args.namespace == one(objs, "Deployment")["metadata"]["namespace"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_recycler_command_line_is_tsfleet_recycle(name, pod_files, monkeypatch):
    spec = pod_spec(overlay(name))
    recycler = container(spec, "recycler")
    assert recycler["command"] == ["python", "-m", "tsfleet"]
    args = parse_tsfleet(recycler["args"], pod_files, monkeypatch)
    assert args.command == "recycle"
    assert args.config == "/opt/tsfleet/config.properties" and args.manifest == "/opt/tsfleet/fleet.yaml"
    # On the pod's address for Prometheus, on the port the pod declares.
    assert args.metrics_host == "0.0.0.0"
    assert {p["name"]: p["containerPort"] for p in recycler["ports"]} == {"recycler": args.metrics_port}


@pytest.mark.parametrize("name", OVERLAYS)
def test_torchserve_command_line_is_tsfleet_pod(name, monkeypatch):
    spec = pod_spec(overlay(name))
    torchserve = container(spec, "torchserve")
    assert torchserve["command"] == ["python", "-m", "tsfleet.k8s.pod", "torchserve"]
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
    # every model, and the workflows too (they are registered last: the pod waits for them)
    assert health._models_asked(query, readiness) == (sorted(fleet.models), True), "the query asks for everything"
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
        assert command[:3] == ["python", "-m", "tsfleet.k8s.pod"]
        assert pod.main(command[3:]) == 0
        config, timeout = seen[-1]
        assert str(config) == "/opt/tsfleet/config.properties"
        assert timeout < torchserve[f"{kind}Probe"]["timeoutSeconds"], "ping gives up before the kubelet does"
    assert "readinessProbe" not in torchserve, "the router's /readyz is the pod's readiness"
    assert Endpoints.from_properties(pod_files / "config.properties").host == "127.0.0.1"


# --- Services and the NetworkPolicy ---------------------------------------------------------------

def sidecar_ports(spec: dict) -> dict[str, tuple[str, int]]:
    """Port name -> (container, number), for the native sidecars (init containers)."""
    return {p["name"]: (c["name"], p["containerPort"]) for c in spec["initContainers"] for p in c.get("ports", [])}


@pytest.mark.parametrize("name", OVERLAYS)
def test_services_reach_the_pod_s_ports(name, pod_files):
    """The router's ports by name; TorchServe's and the recycler's metrics by number, the
    numbers their processes listen on (a named targetPort of a native sidecar finds no
    endpoint before Kubernetes 1.32)."""
    objs = overlay(name)
    spec = pod_spec(objs)
    labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    router_ports = {p["name"]: p["containerPort"] for p in container(spec, "router")["ports"]}
    sidecars = sidecar_ports(spec)
    served = {}
    for service in (o for o in objs if o["kind"] == "Service"):
        assert service["spec"]["type"] == "ClusterIP"
        assert service["spec"]["selector"].items() <= labels.items()
        for port in service["spec"]["ports"]:
            target = port["targetPort"]
            if isinstance(target, str):
                assert target in router_ports, f"{service['metadata']['name']}: no router port {target}"
                assert port["port"] == router_ports[target], "the Service keeps the router's port numbers"
            else:
                # The sidecar port of that number, under the Service port's own name.
                assert sidecars.get(port["name"], (None, None))[1] == target == port["port"], port
            served.setdefault(service["metadata"]["name"], {})[port["name"]] = target
    assert served == {"tsfleet": {"http": "http", "grpc": "grpc"},
                      "tsfleet-internal": {"admin": "admin", "router": "http", "metrics": sidecars["metrics"][1],
                                           "recycler": sidecars["recycler"][1]}}
    # What the processes bind: the pod's config.properties and the recycler's --metrics-port.
    assert sidecars["metrics"] == ("torchserve", Endpoints.from_properties(pod_files / "config.properties").metrics)
    assert sidecars["recycler"] == ("recycler", int(arg_value(container(spec, "recycler")["args"], "--metrics-port")))
    internal = one(objs, "Service", "tsfleet-internal")
    assert internal["metadata"]["labels"]["app.kubernetes.io/component"] == "internal", \
        "k8s/monitoring's ServiceMonitor selects it by this label"


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_service_monitor_scrapes_ports_the_selected_service_has(name):
    objs = overlay(name)
    monitor = one(objs, "ServiceMonitor")["spec"]
    selected = [o for o in objs if o["kind"] == "Service"
                and monitor["selector"]["matchLabels"].items() <= o["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in selected] == ["tsfleet-internal"]
    names = {p["name"] for p in selected[0]["spec"]["ports"]}
    scraped = {e["port"] for e in monitor["endpoints"]}
    assert scraped == {"metrics", "router", "recycler"} and scraped <= names
    assert "admin" not in scraped, "the admin port wants its token and serves no /metrics"


@pytest.mark.parametrize("name", OVERLAYS)
def test_network_policy_opens_only_the_inference_ports_to_clients(name):
    objs = overlay(name)
    policy = one(objs, "NetworkPolicy")["spec"]
    labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    open_rules = [r for r in policy["ingress"] if "from" not in r]
    assert [sorted(p["port"] for p in r["ports"]) for r in open_rules] == [["grpc", "http"]]
    fenced = {str(r["from"]): sorted(map(str, (p["port"] for p in r["ports"]))) for r in policy["ingress"] if "from" in r}
    metrics = one(objs, "Service", "tsfleet-internal")["spec"]["ports"]
    metrics_ports = sorted(str(p["targetPort"]) for p in metrics if p["name"] in ("metrics", "recycler"))
    assert fenced == {
        str([{"podSelector": {"matchLabels": {"tsfleet.io/admin-client": "true"}}}]): ["admin"],
        # Prometheus's namespace (k8s/README.md: change it to yours), on the two metrics ports only.
        str([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]): metrics_ports,
    }
    assert metrics_ports == ["8082", "8083"]
    every_port = {str(p["port"]) for r in policy["ingress"] for p in r["ports"]}
    assert not every_port & {"8080", "8081", "7070", "7071"}, "TorchServe's inference and management stay closed"
    assert all(p["protocol"] == "TCP" for r in policy["ingress"] for p in r["ports"])
