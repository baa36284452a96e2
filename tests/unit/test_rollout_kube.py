"""``tsfleet rollout ... --kube`` (tsfleet/k8s/rollout.py) with a stand-in for kubectl: a small
script that keeps one ConfigMap in a JSON file and answers ``get -o json`` and ``patch --type
merge`` as kubectl does (a stale resourceVersion is a Conflict), logging each call."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tsfleet.cli import main
from tsfleet.manifest import load_fleet
from tsfleet.router.policy import routes_doc

ROOT = Path(__file__).resolve().parents[2]

KUBECTL = r'''
import json, os, sys
state, args = os.environ["FAKE_KUBECTL_STATE"], sys.argv[1:]
with open(state + ".log", "a") as log:
    log.write(json.dumps(args) + "\n")
assert args[:2] == ["-n", "tsfleet"], args
verb, kind, name = args[2:5]
if not os.path.exists(state) or name != "tsfleet-routes":
    sys.exit(f'Error from server (NotFound): configmaps "{name}" not found')
cm = json.load(open(state))
if verb == "get":
    print(json.dumps(cm))
elif verb == "patch":
    assert args[5:8] == ["--type", "merge", "-p"], args
    patch = json.loads(args[8])
    if os.environ.get("FAKE_KUBECTL_CONFLICTS") and not os.path.exists(state + ".conflicted"):
        open(state + ".conflicted", "w").close()
        cm["metadata"]["resourceVersion"] = str(int(cm["metadata"]["resourceVersion"]) + 1)  # someone else wrote
        json.dump(cm, open(state, "w"))
    wanted = patch.get("metadata", {}).get("resourceVersion")
    if wanted and wanted != cm["metadata"]["resourceVersion"]:
        sys.exit('Error from server (Conflict): Operation cannot be fulfilled on configmaps "tsfleet-routes": '
                 'the object has been modified; please apply your changes to the latest version and try again')
    cm.setdefault("data", {}).update(patch["data"])
    cm["metadata"]["resourceVersion"] = str(int(cm["metadata"]["resourceVersion"]) + 1)
    json.dump(cm, open(state, "w"))
    print("configmap/tsfleet-routes patched")
'''


@pytest.fixture
def kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ConfigMap's file; ``kubectl`` in tmp_path is the stand-in."""
    script = tmp_path / "kubectl"
    script.write_text(f"#!{sys.executable}\n{KUBECTL}")
    script.chmod(0o755)
    state = tmp_path / "configmap.json"
    monkeypatch.setenv("FAKE_KUBECTL_STATE", str(state))
    state.write_text(json.dumps({"kind": "ConfigMap", "metadata": {"name": "tsfleet-routes", "resourceVersion": "1"}}))
    return state


def manifest(tmp_path: Path) -> Path:
    """fleet.yaml as the repo has it (comments kept; promote edits it), handlers found from anywhere."""
    path = tmp_path / "fleet.yaml"
    if not path.exists():
        path.write_text((ROOT / "fleet.yaml").read_text().replace("handler: handlers/", f"handler: {ROOT}/handlers/"))
    return path


def rollout(tmp_path: Path, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = main(["--manifest", str(manifest(tmp_path)), "rollout", *args, "--kube",
                 "--kubectl", str(tmp_path / "kubectl")])
    out = capsys.readouterr()
    return code, out.out, out.err


def routes(state: Path) -> dict[str, Any]:
    return json.loads(json.loads(state.read_text())["data"]["routes.json"])


def test_a_canary_from_start_to_promote_in_the_configmap(kube: Path, tmp_path: Path, capsys) -> None:
    code, out, err = rollout(tmp_path, capsys, "start", "intent-classifier", "1.1", "--weight", "10")
    assert code == 0, err
    assert "1.0 90%, 1.1 10% in ConfigMap tsfleet/tsfleet-routes (key routes.json)" in out
    doc = routes(kube)
    assert doc["routes"]["intent-classifier"] == {"baseline": "1.0", "weights": {"1.0": 90.0, "1.1": 10.0},
                                                  "rolled_back": None}
    routes_doc.check_routes(doc, {"intent-classifier": ["1.0", "1.1"]})  # what the routers will take
    # Written through a merge patch that names the resourceVersion it read.
    patch = json.loads([json.loads(line) for line in Path(f"{kube}.log").read_text().splitlines()][-1][-1])
    assert patch["metadata"] == {"resourceVersion": "1"}

    assert rollout(tmp_path, capsys, "set-weight", "intent-classifier", "1.1", "50")[0] == 0
    assert routes(kube)["routes"]["intent-classifier"]["weights"] == {"1.0": 50.0, "1.1": 50.0}
    code, out, err = rollout(tmp_path, capsys, "status")
    assert code == 0, err
    header, *rows, note = out.splitlines()
    assert header.split()[:6] == ["MODEL", "VERSION", "ROLE", "WEIGHT", "REQUESTS", "ERRORS"]
    # The ConfigMap holds routes, not traffic: each model's weights as the routers will take
    # them, the canary's and the manifest's defaults, and no made-up counts or latencies.
    defaults = {name: spec.default_version for name, spec in load_fleet(manifest(tmp_path)).models.items()}
    expected = [[name, version, "baseline", "100", "0", "0.0%", "-", "-"]
                for name, version in defaults.items() if name != "intent-classifier"]
    expected += [["intent-classifier", "1.0", "baseline", "50", "0", "0.0%", "-", "-"],
                 ["intent-classifier", "1.1", "candidate", "50", "0", "0.0%", "-", "-"]]
    assert sorted(row.split() for row in rows) == sorted(expected)
    assert note == ("(routes from ConfigMap tsfleet/tsfleet-routes (key routes.json); requests and latency "
                    "are per replica, in each router's /metrics)")

    code, out, err = rollout(tmp_path, capsys, "promote", "intent-classifier", "1.1")
    assert code == 0, err
    assert routes(kube)["routes"]["intent-classifier"]["weights"] == {"1.1": 100.0}
    assert routes(kube)["routes"]["intent-classifier"]["baseline"] == "1.1"
    assert "default_version: \"1.1\"" in (tmp_path / "fleet.yaml").read_text().split("intent-classifier:")[1]


def test_a_rollback_by_hand_and_a_conflict_read_again(kube: Path, tmp_path: Path, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert rollout(tmp_path, capsys, "start", "intent-classifier", "1.1", "--weight", "30")[0] == 0
    monkeypatch.setenv("FAKE_KUBECTL_CONFLICTS", "1")  # another writer gets in between read and patch
    code, out, err = rollout(tmp_path, capsys, "rollback", "intent-classifier")
    assert code == 0, err
    assert "all traffic back on 1.0" in out
    route = routes(kube)["routes"]["intent-classifier"]
    assert route["weights"] == {"1.0": 100.0, "1.1": 0.0}
    assert route["rolled_back"]["version"] == "1.1" and route["rolled_back"]["reason"] == "rolled back by hand"
    calls = [json.loads(line)[2] for line in Path(f"{kube}.log").read_text().splitlines()]
    assert calls[-4:] == ["get", "patch", "get", "patch"]


@pytest.mark.parametrize("args, message", [
    (("start", "ghost", "1.0"), "no model 'ghost' in the manifest"),
    (("start", "intent-classifier", "7.0"), "intent-classifier 7.0 is not in the manifest"),
    (("start", "intent-classifier", "1.0"), "1.0 is already the baseline"),
    (("start", "intent-classifier", "1.1", "--weight", "150"), "out of range"),
    (("set-weight", "intent-classifier", "1.1"), "needs MODEL VERSION WEIGHT"),
])
def test_mistakes_are_clear_errors_and_write_nothing(kube: Path, tmp_path: Path, capsys, args, message) -> None:
    before = kube.read_text()
    code, _, err = rollout(tmp_path, capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err
    assert kube.read_text() == before


def test_a_missing_configmap_or_kubectl_says_so(kube: Path, tmp_path: Path, capsys) -> None:
    kube.unlink()
    code, _, err = rollout(tmp_path, capsys, "start", "intent-classifier", "1.1")
    assert code == 2 and "ConfigMap tsfleet/tsfleet-routes (key routes.json) does not exist" in err
    (tmp_path / "kubectl").unlink()
    code, _, err = rollout(tmp_path, capsys, "status")
    assert code == 2 and "not found: install kubectl or give --kubectl" in err


def test_a_configmap_the_routers_refuse_is_not_built_upon(kube: Path, tmp_path: Path, capsys) -> None:
    cm = json.loads(kube.read_text())
    cm["data"] = {"routes.json": "{not json"}
    kube.write_text(json.dumps(cm))
    code, _, err = rollout(tmp_path, capsys, "start", "intent-classifier", "1.1")
    assert code == 2 and "does not hold JSON" in err and "kubectl -n tsfleet edit configmap tsfleet-routes" in err
    assert json.loads(kube.read_text())["data"] == {"routes.json": "{not json"}
