"""The k8s/ overlays as kubectl renders them, and the tools that check them, for tests/k8s.

The tools live in their own venv (``make k8s-tools``: .venv-k8s, or $K8S_VENV). A tool that
is missing fails the test that needs it, naming it: these checks are never skipped.
"""
from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
# Overlays that render the fleet's pod as two Deployments (a stable and a canary track) have
# tests of their own (test_gateway_overlay.py); every other overlay renders one Deployment,
# and the tests that go through OVERLAYS hold each of those to the same rules.
TRACK_OVERLAYS = ("gateway",)
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml")
                  if p.parent.name not in TRACK_OVERLAYS)
TOOLS_VENV = Path(os.environ.get("K8S_VENV", ROOT / ".venv-k8s"))
README = K8S / "README.md"


def tool(name: str) -> Path:
    """The path of one of `make k8s-tools`'s tools; fails the test, naming it, when absent."""
    path = TOOLS_VENV / "bin" / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{name} is not installed in {TOOLS_VENV}: run `make k8s-tools` "
                    f"(scripts/install-k8s-tools.sh), which says why when it cannot install it", pytrace=False)
    return path


def run(cmd: list[str | Path], timeout: float = 300, **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)


@functools.lru_cache(maxsize=None)
def render_text(path: str) -> str:
    """`kubectl kustomize` of a kustomization folder (relative to the repo root)."""
    done = run([tool("kubectl"), "kustomize", ROOT / path])
    assert done.returncode == 0, f"kubectl kustomize {path} failed:\n{done.stderr}"
    return done.stdout


def objects(path: str) -> list[dict[str, Any]]:
    """The objects a kustomization renders (fresh copies: tests may change them)."""
    return [doc for doc in yaml.safe_load_all(render_text(path)) if doc]


def overlay(name: str) -> list[dict[str, Any]]:
    return objects(f"k8s/overlays/{name}")


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of ``kind`` (and ``name``); fails when there is none or several."""
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def pod_spec(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "Deployment")["spec"]["template"]["spec"]


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every container of a pod, init containers (the sidecars) first."""
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in containers(spec) if c["name"] == name]
    assert len(found) == 1, f"expected one container {name!r}, found {len(found)}"
    return found[0]


def mounts(spec: dict[str, Any], name: str) -> dict[str, dict[str, Any]]:
    """Container ``name``'s volume mounts by mount path, each with its volume's definition."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {m["mountPath"]: {**m, "volume": volumes[m["name"]]} for m in container(spec, name).get("volumeMounts", [])}


def writable_mount(spec: dict[str, Any], name: str, path: str) -> dict[str, Any]:
    """The writable volume mount that holds ``path`` in container ``name`` (the deepest one,
    as the kernel resolves nested mounts); fails when the path is on the read-only root."""
    holders = [(p, m) for p, m in mounts(spec, name).items() if path == p or path.startswith(p.rstrip("/") + "/")]
    assert holders, f"{name}: {path} is on no volume: the root filesystem is read-only"
    mount_path, mount = max(holders, key=lambda pm: len(pm[0]))
    assert not mount.get("readOnly"), f"{name}: {path} is on {mount_path}, mounted read-only"
    assert "emptyDir" in mount["volume"], f"{name}: {path} is on {mount_path}, which is not an emptyDir"
    return mount


def arg_value(args: list[str], flag: str) -> str:
    assert args.count(flag) == 1, f"expected {flag} once in {args}"
    return args[args.index(flag) + 1]


def quantity_bytes(text: str) -> float:
    """A Kubernetes memory quantity (16Mi, 1Gi, 500M) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * units[unit]
    return float(text)
