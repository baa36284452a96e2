"""Every overlay renders, and every object it renders is valid for Kubernetes 1.30 and the
newest version kubernetes-validate knows, strictly: an unknown field or a wrong type fails."""
from __future__ import annotations

import copy
import json

import pytest
import yaml

from tests.k8s.rendered import OVERLAYS, ROOT, objects, overlay, render_text, run, tool

pytestmark = pytest.mark.k8s

# The oldest version the manifests are for (native sidecars on by default since 1.29,
# restricted Pod Security labels of v1.30) and the newest the validator has schemas for.
VERSIONS = ("1.30.0", "1.37.0")
# Custom resources have no schema in kubernetes-validate: these kinds, and only these, may
# come back without one, and only from k8s/monitoring (the Prometheus operator's CRDs).
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
VALIDATOR = ROOT / "tests" / "k8s" / "validate_objects.py"


def validate(docs: list[dict], version: str) -> list[dict]:
    """One result per object: "ok", "invalid" (with the path and message) or "no-schema"."""
    done = run([tool("python"), VALIDATOR, version], input=yaml.safe_dump_all(docs))
    assert done.returncode == 0, f"the validator failed:\n{done.stderr}"
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == len(docs), done.stderr
    return results


def test_there_are_cpu_and_gpu_overlays():
    assert {"cpu", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlay_renders_the_whole_fleet(name):
    kinds = {o["kind"] for o in overlay(name)}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service",
            "PodDisruptionBudget", "HorizontalPodAutoscaler", "NetworkPolicy"} <= kinds
    namespaces = {o["metadata"].get("namespace") for o in overlay(name) if o["kind"] != "Namespace"}
    assert namespaces == {"tsfleet"}, "every object belongs to the fleet's namespace"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", OVERLAYS)
def test_every_object_is_valid_strictly(name, version):
    results = validate(overlay(name), version)
    invalid = [r for r in results if r["result"] == "invalid"]
    assert not invalid, "\n".join(f"{r['kind']}/{r['name']}: {r['path']}: {r['message']}" for r in invalid)
    unknown = [r for r in results if r["result"] == "no-schema"]
    assert {(r["apiVersion"], r["kind"]) for r in unknown} <= CUSTOM_KINDS, unknown
    assert sum(r["result"] == "ok" for r in results) >= 10


def test_objects_without_a_schema_are_monitoring_s_custom_resources():
    """The only objects the strict validation cannot check are k8s/monitoring's custom
    resources (present only when the base includes it)."""
    monitoring = ROOT / "k8s" / "monitoring" / "kustomization.yaml"
    custom = {(o["kind"], o["metadata"]["name"]) for o in overlay("gpu")
              if (o["apiVersion"], o["kind"]) in CUSTOM_KINDS}
    if not monitoring.is_file():
        assert not custom
        return
    theirs = {(o["kind"], o["metadata"]["name"]) for o in objects("k8s/monitoring")
              if (o["apiVersion"], o["kind"]) in CUSTOM_KINDS}
    assert custom == theirs


def _router(docs: list[dict]) -> dict:
    deployment = next(o for o in docs if o["kind"] == "Deployment")
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "router")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("mistake", ["unknown field", "wrong type", "misspelt kind", "sidecar field misplaced"])
def test_a_deliberately_wrong_object_fails(mistake, version):
    """The validation is strict: each of these mistakes, made in an otherwise valid object of
    the gpu overlay, is reported as invalid, or as a kind without a schema."""
    docs = copy.deepcopy(overlay("gpu"))
    deployment = next(o for o in docs if o["kind"] == "Deployment")
    if mistake == "unknown field":
        _router(docs)["livenessProbe"]["httpGet"]["paht"] = "/livez"
    elif mistake == "wrong type":
        _router(docs)["ports"][0]["containerPort"] = "eighty-ninety"
    elif mistake == "misspelt kind":
        deployment["kind"] = "Deploymnet"
    else:  # restartPolicy is a field of containers, not of a pod's template metadata
        deployment["spec"]["template"]["metadata"]["restartPolicy"] = "Always"
    results = validate([deployment], version)
    assert results[0]["result"] in ("invalid", "no-schema"), results
    if mistake == "unknown field":
        assert "paht" in results[0]["message"]
    if mistake == "wrong type":
        assert results[0]["path"].endswith("ports.0.containerPort")


def test_kustomize_refuses_files_outside_the_base(tmp_path):
    """Why k8s/base/files/ holds copies: kustomize does not read ../../fleet.yaml."""
    base = tmp_path / "k"
    base.mkdir()
    (base / "kustomization.yaml").write_text(
        f"configMapGenerator:\n  - name: fleet\n    files:\n      - {ROOT / 'fleet.yaml'}\n")
    done = run([tool("kubectl"), "kustomize", base])
    assert done.returncode != 0 and "security" in done.stderr.lower() + done.stdout.lower(), done.stderr


def test_base_includes_monitoring_once_it_exists():
    kustomization = yaml.safe_load((ROOT / "k8s" / "base" / "kustomization.yaml").read_text())
    has = (ROOT / "k8s" / "monitoring" / "kustomization.yaml").is_file()
    assert ("../monitoring" in kustomization["resources"]) == has
    if has:
        assert "ServiceMonitor" in render_text("k8s/overlays/gpu")
