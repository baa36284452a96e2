"""`tsfleet up` (what `make up` runs): whole fleet ready, endpoints printed, Ctrl-C stops it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from tests.fleet_up import alive as _alive, port_open as _port_open, running_up
from tests.integration.conftest import ROOT
from tests.polling import wait_for
from tsfleet.control.client import ManagementClient
from tsfleet.manifest import Fleet, parse_fleet
from tsfleet.control.server import Keys

pytestmark = pytest.mark.slow


def test_up_serves_the_fleet_and_stops_on_ctrl_c(fleet, model_store, tmp_path: Path) -> None:
    with running_up(fleet, model_store, tmp_path) as up:
        out = "".join(up.seen)
        assert "fleet ready in" in out
        assert "warmed up the serving path (25 requests)" in out  # 4 versions and the workflow, 5 each
        for name in ("text-embedder", "intent-classifier", "image-classifier"):
            assert f"{up.ep.url('inference')}/predictions/{name}" in out
        assert "/wfpredict/intent-pipeline" in out
        assert "http://127.0.0.1:8090/predictions/text-embedder" in out and "router_key.json" in out
        keys = Keys.load(tmp_path / "key_file.json")
        resp = requests.post(f"{up.ep.url('inference')}/wfpredict/intent-pipeline",
                             json={"text": "hello, good evening"}, headers=keys.header("inference"), timeout=30)
        assert resp.status_code == 200 and resp.json()["intent"] == "greeting"
        # The router `up` started takes its own key, which it swaps for TorchServe's.
        own = json.loads((tmp_path / "router_key.json").read_text())["inference"]
        assert routed_intent(own) == "travel"

        # `make up` again, to be sure: it changes nothing, and the running fleet stays up.
        again = subprocess.run(up.argv, cwd=tmp_path, env=up.env, capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and "already running" in again.stderr + again.stdout, again
        assert routed_intent(own) == "travel"
        assert requests.post(f"{up.ep.url('inference')}/wfpredict/intent-pipeline", json={"text": "hello"},
                             headers=keys.header("inference"), timeout=30).status_code == 200

        # A router that dies (a crash, the OOM killer) is started again, with its key and weights.
        killed = int((tmp_path / "logs" / "route.pid").read_text())
        os.kill(killed, signal.SIGKILL)
        up.wait_for("the route companion exited (code -9); starting it again", 30)
        wait_for("the router to answer again", lambda: _port_open(8090), timeout=60)
        assert int((tmp_path / "logs" / "route.pid").read_text()) != killed
        assert routed_intent(own) == "travel"

        pids = {name: int((tmp_path / "logs" / f"{name}.pid").read_text()) for name in ("route", "recycle")}
        up.proc.send_signal(signal.SIGINT)
        up.wait_for("stopping the router, the recycler and TorchServe", 30)
        up.proc.send_signal(signal.SIGTERM)  # a second signal (make passing one on) must not cut the stop short
        assert up.proc.wait(timeout=90) == 0
        deadline = time.monotonic() + 30
        while _port_open(up.ep.inference) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _port_open(up.ep.inference), "TorchServe still listening after Ctrl-C"
        assert not [name for name, pid in pids.items() if _alive(pid)], "a companion outlived Ctrl-C"


def routed_intent(key: str) -> str:
    resp = requests.post("http://127.0.0.1:8090/predictions/intent-classifier", json={"text": "fly me to Rome"},
                         headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["intent"]


def test_up_stops_everything_when_its_terminal_hangs_up(fleet, model_store, tmp_path: Path) -> None:
    # A dropped SSH session. TorchServe, the router and the recycler run apart from `up`;
    # they must not be left behind. (That `up` then cannot print is a unit test's matter.)
    with running_up(fleet, model_store, tmp_path, "--router-host", "0.0.0.0") as up:
        pids = {name: int((tmp_path / "logs" / f"{name}.pid").read_text()) for name in ("route", "recycle")}
        # The router serves other machines (and a pod's probes) when asked to; its admin API does not.
        listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(pids["route"]).net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN}
        assert {("0.0.0.0", 8090), ("0.0.0.0", 7090), ("127.0.0.1", 8091)} <= listening, listening
        pids["torchserve"] = _listening_on(up.ep.inference)
        up.proc.send_signal(signal.SIGHUP)
        assert up.proc.wait(timeout=90) == 0
        assert not _port_open(up.ep.inference), "TorchServe still listening after the hang-up"
        # Gone when up returns, TorchServe's frontend included (its own stop only signals it).
        assert not [name for name, pid in pids.items() if _alive(pid)], "a process outlived the hang-up"


def _listening_on(port: int) -> int:
    return next(c.pid for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port)


def lagging_config_and_manifest(tmp_path: Path) -> tuple[Fleet, Path]:
    """A manifest that moved on after config.properties was rendered (1.1 added, applied and
    promoted, with no `tsfleet config`): the fleet the config was rendered from, and the
    manifest's path."""
    doc = yaml.safe_load((ROOT / "fleet.yaml").read_text())
    doc["models"]["intent-classifier"]["default_version"] = "1.1"
    folder = tmp_path / "manifest"
    folder.mkdir()
    (folder / "handlers").symlink_to(ROOT / "handlers")
    (folder / "fleet.yaml").write_text(yaml.safe_dump(doc))
    old = yaml.safe_load((ROOT / "fleet.yaml").read_text())
    old["models"]["intent-classifier"]["versions"].pop("1.1")
    return parse_fleet(old, ROOT), folder / "fleet.yaml"


def test_up_starts_torchserve_again_when_it_dies_and_the_router_s_clients_carry_on(model_store,
                                                                                  tmp_path: Path) -> None:
    rendered_from, manifest = lagging_config_and_manifest(tmp_path)
    with running_up(rendered_from, model_store, tmp_path, manifest=manifest) as up:
        # up took TorchServe from what config.properties says to what the manifest says.
        assert any("register" in line and "intent-classifier 1.1" in line for line in up.seen), "".join(up.seen)
        own = json.loads((tmp_path / "router_key.json").read_text())["inference"]
        pids = {name: int((tmp_path / "logs" / f"{name}.pid").read_text()) for name in ("route", "recycle")}
        first = Keys.load(tmp_path / "key_file.json")
        # As if a settings swap of 1.0 were under way: its traffic on a stand-in, which dies with TorchServe.
        admin = {"Authorization": "Bearer " + json.loads((tmp_path / "router_key.json").read_text())["admin"]}
        requests.put("http://127.0.0.1:8091/routes/intent-classifier", json={"aliases": {"1.0": "1.0~swap"}},
                     headers=admin, timeout=30).raise_for_status()
        os.kill(int((tmp_path / "tmp" / ".model_server.pid").read_text()), signal.SIGKILL)  # the JVM, OOM-killed
        up.wait_for("TorchServe exited unexpectedly", 60)
        up.wait_for("TorchServe is back; the router serves again", 240)
        # A new TorchServe, new keys, as the manifest says (not config.properties): the router's
        # clients keep their key and get 1.1, and the workflow is back.
        keys = Keys.load(tmp_path / "key_file.json")
        assert keys.inference != first.inference
        described = ManagementClient(up.ep, tmp_path / "key_file.json").describe("intent-classifier")
        assert {(v.version, v.is_default) for v in described} == {("1.0", False), ("1.1", True)}
        resp = requests.post("http://127.0.0.1:8090/predictions/intent-classifier", json={"text": "fly me to Rome"},
                             headers={"Authorization": f"Bearer {own}"}, timeout=30)
        assert resp.status_code == 200 and resp.json()["intent"] == "travel"
        assert resp.headers["X-Model-Version"] == "1.1"
        routes = requests.get("http://127.0.0.1:8091/routes", headers=admin, timeout=30).json()
        assert routes["intent-classifier"]["aliases"] == {}  # the stand-in is gone, and so is the alias
        resp = requests.post("http://127.0.0.1:8090/predictions/intent-classifier/1.0",
                             json={"text": "fly me to Rome"}, headers={"Authorization": f"Bearer {own}"}, timeout=30)
        assert resp.status_code == 200 and resp.json()["intent"] == "travel", resp.text
        resp = requests.post(f"{up.ep.url('inference')}/wfpredict/intent-pipeline",
                             json={"text": "hello, good evening"}, headers=keys.header("inference"), timeout=30)
        assert resp.status_code == 200 and resp.json()["intent"] == "greeting"
        # The companions rode it out.
        assert all(_alive(pid) for pid in pids.values())
        assert pids == {name: int((tmp_path / "logs" / f"{name}.pid").read_text()) for name in ("route", "recycle")}

        up.proc.send_signal(signal.SIGINT)
        assert up.proc.wait(timeout=90) == 0
        assert not _port_open(up.ep.inference), "TorchServe still listening after Ctrl-C"
        assert not [name for name, pid in pids.items() if _alive(pid)], "a companion outlived Ctrl-C"
