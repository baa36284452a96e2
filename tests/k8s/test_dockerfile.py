"""k8s/Dockerfile read as Docker reads it (no daemon here to build it): pinned base image,
non-root numeric user, CPU/GPU variants of requirements.txt's torch, the archives built as
`make build` builds them, a read-only runtime, and a build context of only what it needs."""
from __future__ import annotations

import re
import shlex

import pytest

from tsfleet.manifest import load_fleet
from tsfleet.build.recipes import RECIPES
from tests.k8s.rendered import K8S, ROOT, container, containers, overlay, pod_spec

pytestmark = pytest.mark.k8s

DOCKERFILE = K8S / "Dockerfile"
APP = "/opt/tsfleet"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines, joined = [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") or not raw.strip():
            continue
        joined += raw.rstrip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        lines.append(joined)
        joined = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line.strip() else "") for line in lines]


def stages(text: str) -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions(text):
        if ins[0] == "FROM":
            out.append([])
        out[-1].append(ins)
    return out


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env = {}
    for ins, args in stage:
        if ins == "ENV":
            for item in shlex.split(args):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def problems(text: str) -> list[str]:
    """What is wrong with a Dockerfile by this project's rules; [] for a good one."""
    found = []
    all_stages = stages(text)
    bases = [s[0][1].split()[0] for s in all_stages]
    for base in bases:
        repo, _, tag = base.rpartition(":")
        if not repo or tag == "latest" or not re.search(r"\d", tag) or "$" in base:
            found.append(f"base image not pinned by a version tag: {base}")
    if len(set(bases)) != 1:
        found.append(f"the stages start from different images: {bases}")
    runtime = all_stages[-1]
    users = [args for ins, args in runtime if ins == "USER"]
    if not users or not re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1].strip()):
        found.append(f"the runtime stage's last USER is not a numeric non-root uid:gid: {users}")
    build = all_stages[0]
    args = {a.split("=")[0]: a.partition("=")[2] for ins, a in build if ins == "ARG"}
    if args.get("TORCH_VARIANT") != "cpu":
        found.append("no ARG TORCH_VARIANT defaulting to cpu in the build stage")
    runs = " ".join(a for ins, a in build if ins == "RUN")
    if "download.pytorch.org/whl/${TORCH_VARIANT}" not in runs or "^torch==" not in runs:
        found.append("torch is not installed from the variant's index at requirements.txt's pin")
    if re.search(r":latest\b", text):
        found.append("an image tagged latest appears in the Dockerfile")
    return found


def test_the_dockerfile_has_no_problems():
    assert problems(DOCKERFILE.read_text()) == []


@pytest.mark.parametrize("mutation", [
    ("FROM python:3.11.7-slim-bookworm AS build", "FROM python:latest AS build"),
    ("FROM python:3.11.7-slim-bookworm AS runtime", "FROM python AS runtime"),
    ("FROM python:3.11.7-slim-bookworm AS runtime", "FROM python:3.12.1-slim-bookworm AS runtime"),
    ("USER 10001:10001", "USER root"),
    ("USER 10001:10001", "USER 0:0"),
    ("ARG TORCH_VARIANT=cpu\nENV", "ARG TORCH_VARIANT=cu128\nENV"),
    ('torch_pin="$(grep -E \'^torch==\' requirements.txt)"', 'torch_pin="torch"'),
])
def test_each_rule_catches_its_mistake(mutation):
    text = DOCKERFILE.read_text()
    old, new = mutation
    assert old in text, f"the mutation no longer applies: {old!r}"
    assert problems(text.replace(old, new, 1))


def test_the_pod_runs_as_the_image_s_user():
    user = [a for ins, a in stages(DOCKERFILE.read_text())[-1] if ins == "USER"][-1]
    uid, gid = (int(x) for x in user.split(":"))
    for name in ("cpu", "gpu"):
        pod = pod_spec(overlay(name))["securityContext"]
        assert (pod["runAsUser"], pod["runAsGroup"]) == (uid, gid)


def test_requirements_pin_the_torch_the_variants_install():
    pins = [line for line in (ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch==")]
    assert len(pins) == 1 and re.fullmatch(r"torch==\d+\.\d+\.\d+", pins[0])


def test_the_build_stage_builds_the_archives_as_make_build_does():
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(r"^build:.*\n\t(.+)$", makefile, re.M).group(1)
    assert recipe.split() == ["$(TSFLEET)", "build"]
    build = stages(DOCKERFILE.read_text())[0]
    runs = " ".join(a for ins, a in build if ins == "RUN")
    assert ".venv/bin/tsfleet build" in runs and ".venv/bin/tsfleet config --check" in runs
    assert ".venv/bin/pip install -r requirements.txt" in runs
    assert ("WORKDIR", APP) in build


def test_the_runtime_writes_only_to_the_pod_s_volumes():
    runtime = stages(DOCKERFILE.read_text())[-1]
    env = env_of(runtime)
    assert env["PATH"].startswith(f"{APP}/.venv/bin:"), "the pods' `python` is the image's venv"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["TMPDIR"] == env["TEMP"] == env["HOME"] == "/tmp"
    for name in ("cpu", "gpu"):
        spec = pod_spec(overlay(name))
        for c in containers(spec):
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{c['name']}: /tmp is not a volume"
    copied = [a for ins, a in runtime if ins == "COPY"]
    for path in ("model_store", "handlers", "tsfleet", ".venv", "fleet.yaml", "config.properties"):
        assert any(f"{APP}/{path}" in a for a in copied), f"the runtime stage does not copy {path}"
    cmd = [a for ins, a in runtime if ins == "CMD"][-1]
    assert '"tsfleet.k8s.pod", "torchserve"' in cmd
    ts = container(pod_spec(overlay("gpu")), "torchserve")
    assert ts["args"][ts["args"].index("--model-store") + 1] == f"{APP}/model_store"


# --- the build context -------------------------------------------------------------------------

def _pattern(p: str) -> re.Pattern:
    p = p.strip().strip("/")
    out = re.escape(p).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
    return re.compile(out + "(/.*)?")  # a folder's pattern covers what is in it


def in_context(path: str) -> bool:
    """Whether .dockerignore lets ``path`` (relative to the repo root) into the build context:
    the last pattern that matches it decides, a `!` one re-including it."""
    keep = True
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        if _pattern(line.lstrip("!")).fullmatch(path):
            keep = negated
    return keep


def test_the_build_context_holds_what_the_build_reads():
    build = stages(DOCKERFILE.read_text())[0]
    for ins, args in build:
        if ins == "COPY" and "--from" not in args:
            for source in args.split()[:-1]:
                assert in_context(source.rstrip("/") + ("/x.py" if source.endswith("/") else "")), source
    needed = {rel for recipe in RECIPES.values() for rel in recipe.inputs}
    fleet = load_fleet(ROOT / "fleet.yaml")
    needed |= {str(v.handler.relative_to(ROOT)) for v in fleet.versions()}
    needed |= {"handlers/workflow_nodes.py", "data/intents/train.jsonl"}
    missing = sorted(p for p in needed if not in_context(p))
    assert not missing, f".dockerignore keeps out what the build reads: {missing}"


@pytest.mark.parametrize("path", [".venv/bin/python", ".venv-k8s/bin/checkov", "model_store/text-embedder-1.0.mar",
                                  "build/artifacts/minilm/model.safetensors", "key_file.json", "router_key.json",
                                  "logs/ts_log.log", ".git/HEAD", "tests/k8s/test_dockerfile.py",
                                  "tsfleet/__pycache__/pod.cpython-311.pyc", "k8s/base/deployment.yaml"])
def test_the_build_context_leaves_out_local_state_and_secrets(path):
    assert not in_context(path)


def test_the_context_matcher_can_say_yes():
    assert in_context("tsfleet/k8s/pod.py") and in_context("requirements.txt")
