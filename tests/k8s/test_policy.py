"""checkov's policy checks on every rendered overlay, with each skipped check named and
justified in k8s/README.md, and hadolint on k8s/Dockerfile."""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.k8s.rendered import K8S, OVERLAYS, README, overlay, run, tool

pytestmark = pytest.mark.k8s

CONFIG = K8S / ".checkov.yaml"
# A row of README's skip table: | `CKV_...` | what it asks | why it is skipped here |
SKIP_ROW = re.compile(r"^\|\s*`(CKV2?_K8S_\d+)`\s*\|([^|]*)\|([^|]*)\|\s*$", re.M)


def skips() -> list[str]:
    return yaml.safe_load(CONFIG.read_text())["skip-check"]


def checkov(docs: list[dict], tmp_path: Path, *, with_skips: bool = True) -> dict:
    """checkov's JSON report on ``docs`` (with k8s/.checkov.yaml's skips, or none)."""
    target = tmp_path / "rendered.yaml"
    target.write_text(yaml.safe_dump_all(docs))
    cmd = [tool("checkov"), "-f", target, "-o", "json"]
    cmd += ["--config-file", CONFIG] if with_skips else ["--framework", "kubernetes", "--skip-download"]
    done = run(cmd, cwd=tmp_path)  # anything it writes stays in tmp_path
    assert done.returncode in (0, 1) and done.stdout.strip(), f"checkov did not run:\n{done.stderr[-3000:]}"
    report = json.loads(done.stdout)
    return report[0] if isinstance(report, list) else report


def failed(report: dict) -> set[str]:
    return {c["check_id"] for c in report["results"]["failed_checks"]}


@pytest.mark.parametrize("name", OVERLAYS)
def test_checkov_passes_with_only_the_justified_skips(name, tmp_path):
    report = checkov(overlay(name), tmp_path)
    assert report["summary"]["parsing_errors"] == 0
    assert not failed(report), [(c["check_id"], c["check_name"], c["resource"])
                                for c in report["results"]["failed_checks"]]
    assert report["summary"]["passed"] >= 100, "checkov looked at the Deployment's pod, not at nothing"


@pytest.mark.parametrize("name", OVERLAYS)
def test_every_skip_is_still_needed(name, tmp_path):
    """Without the skips, exactly the skipped checks fail: a check that passes now is no
    longer skipped, and nothing else fails."""
    assert failed(checkov(overlay(name), tmp_path, with_skips=False)) == set(skips())


def test_every_skip_is_justified_in_the_readme():
    rows = {m.group(1): m.group(3).strip() for m in SKIP_ROW.finditer(README.read_text())}
    for check in skips():
        assert check in rows, f"{check} is skipped in {CONFIG.name} but has no row in k8s/README.md's skip table"
        assert len(rows[check].split()) >= 8, f"{check}: the README's reason is too thin: {rows[check]!r}"
    assert set(rows) == set(skips()), "the README justifies skips that k8s/.checkov.yaml does not make"


def test_checkov_catches_a_privileged_sidecar(tmp_path):
    """The checks are real: a privileged TorchServe container with an added capability fails."""
    docs = copy.deepcopy(overlay("gpu"))
    pod = next(o for o in docs if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "torchserve")
    sidecar["securityContext"].update(privileged=True, capabilities={"add": ["SYS_ADMIN"]})
    assert {"CKV_K8S_16", "CKV_K8S_37"} <= failed(checkov(docs, tmp_path))


def test_hadolint_passes_on_the_dockerfile():
    done = run([tool("hadolint"), K8S / "Dockerfile"])
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_fails_an_unpinned_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\nRUN pip install torch\n")
    done = run([tool("hadolint"), bad])
    assert done.returncode != 0
    assert {"DL3007", "DL3008", "DL3013"} <= set(re.findall(r"DL\d{4}", done.stdout)), done.stdout
