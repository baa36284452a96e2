"""`tsfleet plan/apply/status` against a real TorchServe that starts empty."""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Iterator

import pytest
import requests
import yaml

from tests.integration.conftest import ROOT, new_server
from tsfleet.control.apply import apply, current_plan
from tsfleet.build.archive import Builder
from tsfleet.control.client import ManagementClient
from tsfleet.errors import FleetError, Unreachable
from tsfleet.manifest import Fleet, parse_fleet
from tsfleet.control.server import TorchServe
from tsfleet.control.status import collect
from tsfleet.control.up import bring_up

pytestmark = pytest.mark.slow
BASE = yaml.safe_load((ROOT / "fleet.yaml").read_text())


def small_fleet(edit=None) -> Fleet:
    """Intent classifier 1.0 + 1.1 and the image classifier; no workflow (fewer workers)."""
    doc = copy.deepcopy(BASE)
    doc["models"].pop("text-embedder")
    doc["workflows"] = {}
    if edit:
        edit(doc)
    return parse_fleet(doc, ROOT)


@pytest.fixture(scope="module")
def empty_server(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    ts = new_server(small_fleet(), model_store, tmp_path_factory.mktemp("empty-ts"), load_models=False)
    ts.start(snapshots=False)
    try:
        ts.wait_for_keys(deadline=time.monotonic() + 120)
        yield ts
    finally:
        ts.stop()


def versions(client: ManagementClient) -> dict[tuple[str, str], tuple[bool, int, int]]:
    return {(v.model, v.version): (v.is_default, v.batch_size, v.ready_workers)
            for vs in client.state().values() for v in vs}


def test_plan_apply_converge_and_a_second_apply_does_nothing(empty_server: TorchServe) -> None:
    client = empty_server.client
    fleet = small_fleet()
    steps = current_plan(fleet, client)
    assert [s.action for s in steps] == ["register"] * 3 + ["set-default"] * 2
    lines: list[str] = []
    apply(fleet, client, lines.append)
    assert len(lines) == 5 and lines[0].startswith("[1/5] register")
    workers = {(s.model, s.version): s.serving.workers for s in fleet.versions()}  # image-classifier ships 2
    assert versions(client) == {
        ("intent-classifier", "1.0"): (True, 8, workers["intent-classifier", "1.0"]),
        ("intent-classifier", "1.1"): (False, 8, workers["intent-classifier", "1.1"]),
        ("image-classifier", "1.0"): (True, 8, workers["image-classifier", "1.0"]),
    }
    assert workers["image-classifier", "1.0"] == 2
    assert current_plan(fleet, client) == []
    assert apply(fleet, client, lines.append) == []
    assert collect(fleet, client)["in_sync"] is True

    # Scale (fleet.yaml ships image-classifier with 2: down to 1), switch the default, then
    # retire the old version.
    def edit(doc):
        doc["models"]["image-classifier"]["serving"] = {"workers": 1}
        doc["models"]["intent-classifier"]["default_version"] = "1.1"
    changed = small_fleet(edit)
    assert [s.action for s in current_plan(changed, client)] == ["scale", "set-default"]
    apply(changed, client, lines.append, report_dir=empty_server.report_dir)
    got = versions(client)
    assert got[("image-classifier", "1.0")] == (True, 8, 1)
    assert got[("intent-classifier", "1.1")][0] is True

    def retire(doc):
        edit(doc)
        del doc["models"]["intent-classifier"]["versions"]["1.0"]
    retired = small_fleet(retire)
    assert [(s.action, s.version) for s in current_plan(retired, client)] == [("unregister", "1.0")]
    apply(retired, client, lines.append, report_dir=empty_server.report_dir)
    assert ("intent-classifier", "1.0") not in versions(client)

    # Batch settings are swapped in place, for a non-default version and for the default
    # (tests/integration/test_swap.py does it under load).
    def rebatch(doc):
        retire(doc)
        doc["models"]["intent-classifier"]["versions"]["1.0"] = {"params": {"seed": 1}, "serving": {"batch_size": 4}}
    rebatched = small_fleet(rebatch)
    apply(rebatched, client, lines.append, report_dir=empty_server.report_dir)
    assert versions(client)[("intent-classifier", "1.0")] == (False, 4, 1)
    rebatched_default = small_fleet(lambda d: (rebatch(d), d["models"]["intent-classifier"]["versions"]["1.1"]
                                                .setdefault("serving", {}).update(batch_size=2)))
    apply(rebatched_default, client, lines.append, report_dir=empty_server.report_dir)
    got = versions(client)
    assert got[("intent-classifier", "1.1")] == (True, 2, 1)
    assert set(got) == {("intent-classifier", "1.0"), ("intent-classifier", "1.1"), ("image-classifier", "1.0")}


def test_bad_manifest_leaves_the_server_untouched(empty_server: TorchServe, tmp_path: Path) -> None:
    before = versions(empty_server.client)
    doc = copy.deepcopy(BASE)
    doc["models"]["image-classifier"]["serving"] = {"workers": 3, "max_workers": 1}
    bad = tmp_path / "fleet.yaml"
    bad.write_text(yaml.safe_dump(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "tsfleet", "--manifest", str(bad), "--config", str(empty_server.config),
         "--key-file", str(empty_server.workdir / "key_file.json"), "apply"],
        capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "more than max_workers" in proc.stderr and "Traceback" not in proc.stderr
    assert versions(empty_server.client) == before


def test_unreachable_server_is_a_clear_error(empty_server: TorchServe, tmp_path: Path) -> None:
    from tsfleet.build.properties import Endpoints

    gone = ManagementClient(Endpoints("127.0.0.1", 1, 1, 1), empty_server.workdir / "key_file.json", timeout=5)
    with pytest.raises(Unreachable, match="does not answer"):
        gone.list_models()
    proc = subprocess.run([sys.executable, "-m", "tsfleet", "--key-file", str(tmp_path / "none.json"), "status"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "is TorchServe running" in proc.stderr and "Traceback" not in proc.stderr


def test_fleet_is_back_as_declared_after_sigkill_and_restart(model_store: Path, tmp_path: Path) -> None:
    fleet = small_fleet()
    ts = new_server(fleet, model_store, tmp_path, load_models=False)
    ts.start(snapshots=False)
    try:
        ts.wait_for_keys(deadline=time.monotonic() + 120)
        apply(fleet, ts.client, lambda line: None)
        pid = int((tmp_path / "tmp" / ".model_server.pid").read_text())
        os.kill(pid, signal.SIGKILL)
        ts.start(snapshots=False)  # a bare restart: nothing registered
        ts.wait_for_keys(deadline=time.monotonic() + 120)
        assert collect(fleet, ts.client)["in_sync"] is False
        apply(fleet, ts.client, lambda line: None)
        doc = collect(fleet, ts.client)
        assert doc["in_sync"] is True
        assert all(w["status"] == "READY" for row in doc["models"] for w in row["workers"])
    finally:
        ts.stop()


def broken_archive(good: Path, dest: Path, version: str) -> Path:
    """``good`` as ``version``, with a handler that fails at import, as a corrupt build would."""
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as out:
        manifest = json.loads(src.read("MAR-INF/MANIFEST.json"))
        for name in src.namelist():
            data = src.read(name)
            if name == "MAR-INF/MANIFEST.json":
                manifest["model"]["modelVersion"] = version
                data = json.dumps(manifest).encode()
            elif name == manifest["model"]["handler"]:
                data += b'\nraise RuntimeError("intent_head.pt is corrupt")\n'
            out.writestr(name, data)
    return dest


def with_broken_version(doc: dict) -> None:
    """Intent classifier 1.0 and 1.2 (whose archive broken_archive makes) alone."""
    intents = doc["models"]["intent-classifier"]
    intents["versions"] = {"1.0": intents["versions"]["1.0"], "1.2": {"params": {"seed": 3}}}
    doc["models"] = {"intent-classifier": intents}


def store_with_broken_version(model_store: Path, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy(model_store / "intent-classifier-1.0.mar", store)
    broken_archive(model_store / "intent-classifier-1.0.mar", store / "intent-classifier-1.2.mar", "1.2")
    return store


def test_a_version_whose_workers_fail_to_start_is_taken_out_again(model_store: Path, tmp_path: Path) -> None:
    # TorchServe answers 500 yet keeps such a version, with no worker, and as the default of
    # a model it did not have: apply takes it out, says why, and a later apply tries again.
    store = store_with_broken_version(model_store, tmp_path)
    fleet = small_fleet(with_broken_version)
    ts = new_server(fleet, store, tmp_path / "ts", load_models=False)
    ts.start(snapshots=False)
    try:
        ts.wait_for_keys(time.monotonic() + 120)
        said: list[str] = []
        with pytest.raises(FleetError, match=r"intent-classifier 1\.2 did not start: .*Failed to start workers.*"
                                             r"(unregistered again|TorchServe did not keep it), so the server is as "
                                             r"it was.*logs/model_log\.log"):
            apply(fleet, ts.client, said.append, store=store, report_dir=ts.report_dir)
        assert [(v.version, v.is_default) for v in ts.client.describe("intent-classifier")] == [("1.0", True)]
        assert [(s.action, s.version) for s in current_plan(fleet, ts.client)] == [("register", "1.2")]
        resp = requests.post(ts.ep.url("inference") + "/predictions/intent-classifier", json={"text": "fly me to Rome"},
                             headers=ts.keys.header("inference"), timeout=30)
        assert resp.status_code == 200 and resp.json()["intent"] == "travel"
        assert "intent_head.pt is corrupt" in (ts.workdir / "logs" / "model_log.log").read_text()
    finally:
        ts.stop()


def with_broken_version_and_a_workflow_on_it(doc: dict) -> None:
    with_broken_version(doc)
    doc["models"]["text-embedder"] = BASE["models"]["text-embedder"]
    doc["workflows"] = {"pipe": {"steps": ["text-embedder", "intent-classifier@1.2"]}}


def test_up_serves_the_rest_of_the_fleet_when_a_version_keeps_failing_to_start(model_store: Path, tmp_path: Path) -> None:
    # A restart from config.properties loads every version, the broken one too: TorchServe
    # keeps it, restarting its worker again and again. up must not wait out its timeout and
    # then stop the versions that work (a GPU with no room left for one model, at 3 a.m.);
    # nor stop at the workflow whose copy of that version cannot start either.
    store = store_with_broken_version(model_store, tmp_path)
    shutil.copy(model_store / "text-embedder-1.0.mar", store)
    fleet = small_fleet(with_broken_version_and_a_workflow_on_it)
    Builder(fleet, store, ROOT / "build" / "artifacts", progress=lambda line: None).build_workflow(fleet.workflows["pipe"])
    ts = new_server(fleet, store, tmp_path / "ts", load_models=True)
    said: list[str] = []
    try:
        started = time.monotonic()
        bring_up(ts, fleet, 240, said.append)
        assert time.monotonic() - started < 120  # told from a slow load by its dying workers, not a timeout
        text = "\n".join(said)
        assert "workflow pipe did not start; serving the rest of the fleet without it" in text
        assert "intent-classifier 1.2: its workers keep failing to start; serving the rest of the fleet" in text
        assert "warmed up the serving path (10 requests)" in text  # text-embedder and intent-classifier 1.0
        assert ts.client.list_workflows() == []
        resp = requests.post(ts.ep.url("inference") + "/predictions/intent-classifier/1.0",
                             json={"text": "fly me to Rome"}, headers=ts.keys.header("inference"), timeout=30)
        assert resp.status_code == 200 and resp.json()["intent"] == "travel"
    finally:
        ts.stop()
