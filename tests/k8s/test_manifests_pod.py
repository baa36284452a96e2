"""The serving pod's shape: sidecar order, writable paths, security, shutdown budget,
resources, the GPU overlay, RBAC and autoscaling, each checked against what the code does."""
from __future__ import annotations

import re
import xml.etree.ElementTree as ET

import pytest
import yaml

from tsfleet.control import server
from tsfleet.manifest import load_fleet
from tsfleet.build.properties import LOG_CONFIG
from tsfleet.router.policy.manifest_routes import routes_from_fleet
from tsfleet.router.policy.routing import RoutingTable
from tests.k8s.rendered import (K8S, OVERLAYS, ROOT, arg_value, container, containers, mounts, objects, one, overlay,
                                pod_spec, quantity_bytes, writable_mount)

pytestmark = pytest.mark.k8s

UID = 10001  # k8s/Dockerfile's USER; test_dockerfile.py holds the image to it


def env(c: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in c.get("env", [])}


@pytest.mark.parametrize("name", OVERLAYS)
def test_torchserve_and_recycler_are_sidecars_started_before_the_router(name):
    spec = pod_spec(overlay(name))
    assert [c["name"] for c in spec["initContainers"]] == ["torchserve", "recycler"]
    assert all(c["restartPolicy"] == "Always" for c in spec["initContainers"])
    assert [c["name"] for c in spec["containers"]] == ["router"]
    assert spec["shareProcessNamespace"] is True, "the recycler checks TorchServe's workers by pid"


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_path_a_process_writes_is_a_volume_shared_with_its_readers(name):
    spec = pod_spec(overlay(name))
    ts, recycler, router = (container(spec, n) for n in ("torchserve", "recycler", "router"))
    workdir = arg_value(ts["args"], "--workdir")
    # TorchServe: key_file.json in its working directory, logs/ in it (tsfleet.control.server), TMPDIR
    # and TEMP (pid file, java.io.tmpdir: unpacked archives, worker sockets; worker reports).
    home = writable_mount(spec, "torchserve", f"{workdir}/{server.KEY_FILE}")
    logs = writable_mount(spec, "torchserve", f"{workdir}/logs/ts_log.log")
    assert logs["name"] != home["name"], "logs on disk, the keys in memory"
    assert home["volume"]["emptyDir"].get("medium") == "Memory"
    tmp = env(ts)["TMPDIR"]
    assert env(ts)["TEMP"] == tmp
    shared_tmp = writable_mount(spec, "torchserve", f"{tmp}/.model_server.pid")
    # The recycler reads the workers' reports and drops its flags where they write them.
    report_dir = arg_value(recycler["args"], "--report-dir")
    assert report_dir == f"{tmp}/tsfleet-workers", "handlers.lifecycle.default_report_dir under TorchServe's TMPDIR"
    assert writable_mount(spec, "recycler", report_dir + "/x")["name"] == shared_tmp["name"]
    # Router and recycler read TorchServe's key_file.json from the same volume, read-only.
    for reader in (recycler, router):
        key_file = arg_value(reader["args"], "--key-file")
        assert key_file == f"{workdir}/{server.KEY_FILE}"
        held = mounts(spec, reader["name"])[workdir]
        assert held["name"] == home["name"] and held["readOnly"]
    # The router's state file and temp dir; its keys come from the Secret, read-only.
    writable_mount(spec, "router", arg_value(router["args"], "--state-file") + ".tmp")  # files.write_atomically
    writable_mount(spec, "router", env(router)["TMPDIR"] + "/x")
    key_mount = mounts(spec, "router")["/etc/tsfleet/router-key"]
    assert key_mount["readOnly"] and key_mount["volume"]["secret"]["secretName"] == "tsfleet-router-key"
    assert arg_value(router["args"], "--router-key-file").startswith("/etc/tsfleet/router-key/")
    assert mounts(spec, "torchserve")["/dev/shm"]["volume"]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_emptydir_is_bounded(name):
    spec = pod_spec(overlay(name))
    for volume in spec["volumes"]:
        if "emptyDir" in volume:
            assert quantity_bytes(volume["emptyDir"]["sizeLimit"]) > 0, volume["name"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_runs_locked_down(name):
    spec = pod_spec(overlay(name))
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == pod["runAsGroup"] == pod["fsGroup"] == UID
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    for c in containers(spec):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, c["name"]
        assert "runAsUser" not in sc or sc["runAsUser"] == UID
    namespace = one(overlay(name), "Namespace")["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"


def test_grace_period_covers_the_router_s_drain_and_torchserve_s_stop():
    spec = pod_spec(overlay("gpu"))
    router = container(spec, "router")
    pre_stop = router["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float(arg_value(router["args"], "--drain-s"))
    # The router's preStop and drain, then TorchServe's stop (torchserve --stop, then up to
    # STOP_WAIT_S for the frontend), then the wrapper's exit (tsfleet.k8s.pod: 10 s at most).
    needed = float(pre_stop[1]) + drain + server.STOP_WAIT_S + 10
    assert spec["terminationGracePeriodSeconds"] >= needed


def test_the_log_volume_holds_what_log4j2_keeps():
    """log4j2.xml's rolling files, each at most (keep + 1) x the roll size that the pod's
    JAVA_TOOL_OPTIONS sets, fit the logs volume."""
    spec = pod_spec(overlay("gpu"))
    options = env(container(spec, "torchserve"))["JAVA_TOOL_OPTIONS"]
    size = re.search(r"-Dtsfleet\.logs\.roll_size=(\d+)MB", options)
    keep = re.search(r"-Dtsfleet\.logs\.keep=(\d+)", options)
    assert size and keep, "without them log4j2.xml keeps ten 100 MB archives of each of its files"
    rolling = [e for e in ET.parse(LOG_CONFIG).iter() if e.tag == "RollingFile"]
    assert len(rolling) == 5
    bound = len(rolling) * (int(keep.group(1)) + 1) * int(size.group(1)) * 2**20
    workdir = arg_value(container(spec, "torchserve")["args"], "--workdir")
    logs = writable_mount(spec, "torchserve", f"{workdir}/logs/x")
    assert quantity_bytes(logs["volume"]["emptyDir"]["sizeLimit"]) >= bound


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_container_requests_cpu_and_memory_and_caps_memory(name):
    for c in containers(pod_spec(overlay(name))):
        res = c["resources"]
        assert {"cpu", "memory"} <= set(res["requests"]), c["name"]
        assert quantity_bytes(res["limits"]["memory"]) >= quantity_bytes(res["requests"]["memory"]), c["name"]


@pytest.mark.parametrize("name", OVERLAYS)
def test_images_are_the_overlay_s_fixed_tag(name):
    spec = pod_spec(overlay(name))
    images = {c["image"] for c in containers(spec)}
    assert len(images) == 1, "one image for the three containers"
    image = images.pop()
    repo, _, tag = image.rpartition(":")
    assert repo and "/" not in tag and tag != "latest" and re.fullmatch(r"\d+\.\d+\.\d+-" + name, tag), image
    assert all(c["imagePullPolicy"] == "Always" for c in containers(spec))


def test_gpu_overlay_gives_torchserve_a_gpu_on_gpu_nodes():
    spec = pod_spec(overlay("gpu"))
    ts = container(spec, "torchserve")
    assert ts["resources"]["requests"]["nvidia.com/gpu"] == ts["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert env(ts)["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert spec["nodeSelector"] and {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
        in spec["tolerations"]
    assert all("nvidia.com/gpu" not in c["resources"]["requests"] for c in containers(spec) if c is not ts)
    cpu = pod_spec(overlay("cpu"))
    assert not any("nvidia.com/gpu" in c["resources"]["requests"] for c in containers(cpu))
    assert "nodeSelector" not in cpu and "tolerations" not in cpu


@pytest.mark.parametrize("name", OVERLAYS)
def test_only_the_router_holds_an_api_token_for_the_routes_configmap(name):
    objs = overlay(name)
    spec = pod_spec(objs)
    account = one(objs, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False and spec["automountServiceAccountToken"] is False
    token_volumes = {v["name"] for v in spec["volumes"]
                     if any("serviceAccountToken" in s for s in v.get("projected", {}).get("sources", []))}
    holders = {c["name"] for c in containers(spec) for m in c.get("volumeMounts", []) if m["name"] in token_volumes}
    assert holders == {"router"}
    role = one(objs, "Role")
    routes = arg_value(container(spec, "router")["args"], "--routes-configmap")
    # What tsfleet/k8s/kubectl.py calls: get and merge-patch that one ConfigMap (rollback_record.py),
    # and create an Event when the patch fails. Nothing else: no list, watch, update or delete,
    # no other ConfigMap, no Secret.
    assert role["rules"] == [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": [routes],
                              "verbs": ["get", "patch"]},
                             {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]
    assert "data" not in one(objs, "ConfigMap", routes), "applying again must not reset live routes"
    binding = one(objs, "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": "tsfleet"}]
    assert not [o for o in objs if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_router_follows_the_routes_configmap_through_a_directory_mount(name):
    """The kubelet updates a ConfigMap mounted as a directory (its ..data swap) and never one
    mounted with subPath: the router's --routes-file must be a key under a directory mount of
    the very ConfigMap --routes-configmap names, or replicas never see a change."""
    objs = overlay(name)
    spec = pod_spec(objs)
    args = container(spec, "router")["args"]
    routes_file, configmap = arg_value(args, "--routes-file"), arg_value(args, "--routes-configmap")
    folder, _, key = routes_file.rpartition("/")
    mount = mounts(spec, "router")[folder]
    assert "subPath" not in mount and "subPathExpr" not in mount, "a subPath mount never sees an update"
    assert mount["readOnly"] is True, "the routers write the routes through the API, never to the mount"
    volume = mount["volume"]
    assert set(volume) == {"name", "configMap"} and volume["configMap"]["name"] == configmap
    # Every key, no items list: the ConfigMap starts with no data, and a listed key that is
    # missing keeps the pod from starting (unless optional); the router waits for the file.
    assert "items" not in volume["configMap"] and key == "routes.json"
    assert one(objs, "ConfigMap", configmap)["metadata"]["namespace"] == "tsfleet"
    holders = {c["name"] for c in containers(spec) for m in c.get("volumeMounts", []) if m["name"] == volume["name"]}
    assert holders == {"router"}
    # The RollbackNotRecorded Event names the pod rollback_record.pod_name() finds here.
    router_env = {e["name"]: e for e in container(spec, "router")["env"]}
    assert router_env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_the_gpu_overlay_changes_only_the_router_s_process_count():
    """A strategic-merge patch replaces the router's whole argument list: the gpu overlay must
    repeat the base's arguments (the routes flags included) and change --processes alone."""
    base, gpu = (container(pod_spec(objects(path)), "router")["args"] for path in ("k8s/base", "k8s/overlays/gpu"))
    where = base.index("--processes") + 1
    assert gpu[:where] + gpu[where + 1:] == base[:where] + base[where + 1:]
    assert (base[where], gpu[where]) == ("1", "2")


@pytest.mark.parametrize("name", OVERLAYS)
def test_pdb_and_hpa_govern_the_serving_deployment(name):
    objs = overlay(name)
    deployment = one(objs, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert one(objs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = one(objs, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    assert "replicas" not in deployment["spec"], "the HPA owns the count"
    assert hpa["minReplicas"] >= 2 and hpa["maxReplicas"] > hpa["minReplicas"]
    kinds = {m["type"] for m in hpa["metrics"]}
    assert kinds == {"Pods", "Resource"}
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def test_the_hpa_s_pods_metric_is_what_the_adapter_rule_serves_from_the_router_s_metrics():
    adapter = yaml.safe_load((K8S / "monitoring" / "prometheus-adapter-rules.yaml").read_text())
    rules = yaml.safe_load(adapter["data"]["config.yaml"])["rules"]
    served = {r["name"]["as"]: r for r in rules}
    for name in OVERLAYS:
        hpa = one(overlay(name), "HorizontalPodAutoscaler")["spec"]
        pods = [m["pods"]["metric"]["name"] for m in hpa["metrics"] if m["type"] == "Pods"]
        assert pods and set(pods) <= set(served)
    rule = served["tsfleet_router_in_flight"]
    series = re.match(r"([a-z_:]+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    assert "rate(" in rule["metricsQuery"] and rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    table = RoutingTable(routes_from_fleet(load_fleet(ROOT / "fleet.yaml")))
    table.record("intent-classifier", "1.0", True, 0.25)
    exported = table.prometheus()
    assert re.search(rf"^{series}\{{[^}}]*\}} 0\.25$", exported, re.M), f"the router exports no {series}"
