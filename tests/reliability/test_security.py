"""The fleet's security defaults, against a real TorchServe, router and recycler.

The router and the recycler run as ``tsfleet up`` starts them (companions.start: their own
processes, their logs in logs/ of their work folder, rolled), before the session's
TorchServe. What is checked is what a client or a process on the same machine sees:

- every management call and every router admin call, sent with no key, a wrong key or
  another API's key, is refused with the status each server answers, and changes nothing;
- registration from a URL or from a path outside model_store is refused, and changes nothing;
- every listener is on loopback;
- no key shows in a log, a command's output, a /metrics or probe body, a state file or a
  process's command line; the key files are readable by their owner only.

TorchServe 0.12 answers every refused key with 400 ``InvalidKeyException`` (never 401 or
403), on the management and the inference API alike; the router's admin API answers 401.
"""
from __future__ import annotations

import gzip
import json
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import grpc
import psutil
import pytest
import requests

from tests.fleet_fixtures import ROOT
from tests.polling import wait_for
from tsfleet.control import companions
from tsfleet.build.properties import Endpoints
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc
from tsfleet.control.server import TorchServe

LOOPBACK = {"127.0.0.1", "::1"}
TS_REFUSAL = {"code": 400, "type": "InvalidKeyException",
              "message": "Token Authorization failed. Token either incorrect, expired, or not provided correctly"}
ADMIN_REFUSAL = {"code": 401, "type": "Unauthorized", "message": "admin token missing or wrong (see router_key.json)"}
MODEL, CANARY = "intent-classifier", "1.1"


class Fleet:
    """The session's TorchServe with a router and a recycler started beside it as `up` does."""

    def __init__(self, server: TorchServe, workdir: Path):
        self.server, self.workdir = server, workdir
        free = Endpoints.on_free_ports()
        self.rest, self.admin_port, self.grpc, self.recycler_port = (free.inference, free.management, free.metrics,
                                                                     free.grpc_inference)
        self.common = ["--manifest", str(ROOT / "fleet.yaml"), "--config", str(server.config),
                       "--key-file", str(server.workdir / "key_file.json"),
                       "--router-admin", f"http://127.0.0.1:{self.admin_port}",
                       "--router-key-file", str(workdir / "router_key.json"),
                       "--report-dir", str(server.report_dir)]
        self.recycler = companions.start(workdir, "recycle", [*self.common, "recycle", "--interval", "0.5",
                                                              "--metrics-port", str(self.recycler_port)])
        self.router = companions.start(workdir, "route", [
            *self.common, "route", "--processes", "1", "--host", "127.0.0.1", "--port", str(self.rest),
            "--admin-port", str(self.admin_port), "--grpc-port", str(self.grpc)])
        log = workdir / "logs" / "route.log"
        wait_for("the router's banner in route.log", lambda: self.router.poll() is not None
                 or "router: REST" in (log.read_text() if log.exists() else ""))
        assert self.router.poll() is None, log.read_text()[-3000:]
        wait_for("the recycler's /metrics", lambda: self.recycler.poll() is not None
                 or companions.accepting("127.0.0.1", self.recycler_port))
        assert self.recycler.poll() is None, (workdir / "logs" / "recycle.log").read_text()[-3000:]
        self.router_url = f"http://127.0.0.1:{self.rest}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"

    @property
    def router_keys(self) -> dict[str, Any]:
        return json.loads((self.workdir / "router_key.json").read_text())

    def ts_key(self, which: str) -> str:
        doc = json.loads((self.server.workdir / "key_file.json").read_text())
        return doc[{"inference": "inference", "management": "management", "api": "API"}[which]]["key"]

    def every_key(self) -> set[str]:
        """Every key either server takes or took: TorchServe's three, the router's admin and
        inference keys and the older inference keys a rotation keeps."""
        router = self.router_keys
        keys = {self.ts_key(w) for w in ("inference", "management", "api")} | {router["admin"], router["inference"]}
        keys |= {entry["key"] for entry in router.get("previous_inference", [])}
        assert all(len(k) >= 8 for k in keys), "a key this short would match by chance"
        return keys

    def management(self, method: str, path: str, key: str | None, **kw: Any) -> requests.Response:
        return requests.request(method, self.server.ep.url("management") + path, headers=bearer(key), timeout=120, **kw)

    def admin(self, method: str, path: str, key: str | None, **kw: Any) -> requests.Response:
        return requests.request(method, self.admin_url + path, headers=bearer(key), timeout=30, **kw)

    def processes(self) -> list[psutil.Process]:
        """Every process of the fleet: TorchServe's frontend and its workers, the router, the
        recycler and their log writers (this test process's children)."""
        frontend = psutil.Process(self.server._pid())
        procs = [frontend, *frontend.children(recursive=True), *psutil.Process().children(recursive=True)]
        return list({p.pid: p for p in procs}.values())

    def tsfleet(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "tsfleet", *self.common, *args], cwd=self.workdir,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout + done.stderr

    def stop(self) -> None:
        companions.stop(self.workdir, "route")
        companions.stop(self.workdir, "recycle")


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key is not None else {}


@pytest.fixture(scope="module")
def fleet_up(server: TorchServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(server, tmp_path_factory.mktemp("secured"))
    try:
        yield f
    finally:
        f.stop()


def models_state(f: Fleet) -> dict[str, Any]:
    """What a refused call must leave as it was: every model's versions, default, worker
    counts and batch settings, and the workflows."""
    key = f.ts_key("management")
    names = sorted(m["modelName"] for m in f.management("GET", "/models", key, params={"limit": 1000}).json()["models"])
    described = {}
    for name in names:
        versions = f.management("GET", f"/models/{name}/all", key).json()
        described[name] = sorted((v["modelVersion"], v["modelUrl"], v["minWorkers"], v["maxWorkers"], v["batchSize"],
                                  v["maxBatchDelay"]) for v in versions)
        default = f.management("GET", f"/models/{name}", key).json()
        described[name].append(("default", default[0]["modelVersion"]))
    workflows = sorted(w["workflowName"] for w in f.management("GET", "/workflows", key).json()["workflows"])
    return {"models": described, "workflows": workflows}


def routes_state(f: Fleet) -> dict[str, Any]:
    """The router's routes without their per-arm statistics, which requests move."""
    snap = f.admin("GET", "/routes", f.router_keys["admin"]).json()
    return {model: {k: v for k, v in route.items() if k != "arms"} for model, route in snap.items()}


# Each management call a client could make, as TorchServe's API names it.
MANAGEMENT_CALLS = {
    "list": ("GET", "/models", {}),
    "describe": ("GET", f"/models/{MODEL}/1.0", {}),
    "register": ("POST", "/models", {"params": {"url": "intent-classifier-1.0.mar", "model_name": "intruder",
                                                "initial_workers": 1}}),
    "scale": ("PUT", f"/models/{MODEL}/1.0", {"params": {"min_worker": 2, "synchronous": "true"}}),
    "unregister": ("DELETE", f"/models/{MODEL}/{CANARY}", {}),
    "set-default": ("PUT", f"/models/{MODEL}/{CANARY}/set-default", {}),
    "list workflows": ("GET", "/workflows", {}),
    "register workflow": ("POST", "/workflows", {"params": {"url": "intent-pipeline.war",
                                                           "workflow_name": "intruder"}}),
    "unregister workflow": ("DELETE", "/workflows/intent-pipeline", {}),
}
ADMIN_CALLS = {
    "routes": ("GET", "/routes", {}),
    "weights": ("PUT", f"/routes/{MODEL}", {"json": {"weights": {"1.0": 0, CANARY: 100}}}),
    "rollback": ("POST", f"/routes/{MODEL}/rollback", {}),
    "fleet": ("PUT", "/fleet", {"json": {}}),
    "rotate key": ("POST", "/keys/inference", {"json": {"grace_s": 0}}),
}


def wrong_keys(f: Fleet, api: str) -> dict[str, str | None]:
    """No key, a wrong one, and every key of another API than ``api``."""
    router = f.router_keys
    others = {"no key": None, "wrong key": "not-a-key", "empty key": "",
              "TorchServe inference key": f.ts_key("inference"), "TorchServe management key": f.ts_key("management"),
              "TorchServe token-API key": f.ts_key("api"), "router admin key": router["admin"],
              "router inference key": router["inference"]}
    own = {"management": "TorchServe management key", "admin": "router admin key"}[api]
    del others[own]
    return others


def test_management_calls_without_the_management_key_are_refused_and_change_nothing(fleet_up: Fleet) -> None:
    before = models_state(fleet_up)
    refused = {}
    for call, (method, path, kw) in MANAGEMENT_CALLS.items():
        for who, key in wrong_keys(fleet_up, "management").items():
            resp = fleet_up.management(method, path, key, **kw)
            refused[(call, who)] = (resp.status_code, resp.json())
    assert {k: v for k, v in refused.items() if v != (400, TS_REFUSAL)} == {}
    assert models_state(fleet_up) == before


def test_router_admin_calls_without_the_admin_key_are_refused_and_change_nothing(fleet_up: Fleet) -> None:
    routes, keys = routes_state(fleet_up), fleet_up.router_keys
    refused = {}
    for call, (method, path, kw) in ADMIN_CALLS.items():
        for who, key in wrong_keys(fleet_up, "admin").items():
            resp = fleet_up.admin(method, path, key, **kw)
            refused[(call, who)] = (resp.status_code, resp.json())
    assert {k: v for k, v in refused.items() if v != (401, ADMIN_REFUSAL)} == {}
    assert routes_state(fleet_up) == routes
    assert fleet_up.router_keys == keys  # no rotation happened


def test_inference_with_a_management_or_admin_key_is_refused(fleet_up: Fleet) -> None:
    body, json_type = json.dumps({"text": "book me a flight to Rome"}), {"Content-Type": "application/json"}
    router = fleet_up.router_keys
    answers = {}
    for where, url in (("TorchServe", fleet_up.server.ep.url("inference")), ("router", fleet_up.router_url)):
        for who, key in (("no key", None), ("TorchServe management key", fleet_up.ts_key("management")),
                         ("TorchServe token-API key", fleet_up.ts_key("api")), ("router admin key", router["admin"])):
            resp = requests.post(f"{url}/predictions/{MODEL}", data=body, headers={**json_type, **bearer(key)},
                                 timeout=60)
            answers[(where, who)] = (resp.status_code, resp.json())
    # The router passes a key that is not its own inference key on untouched: TorchServe refuses it.
    assert {k: v for k, v in answers.items() if v != (400, TS_REFUSAL)} == {}
    # The router's inference key is taken by the router only, never by TorchServe itself.
    resp = requests.post(f"{fleet_up.server.ep.url('inference')}/predictions/{MODEL}", data=body,
                         headers={**json_type, **bearer(router["inference"])}, timeout=60)
    assert (resp.status_code, resp.json()) == (400, TS_REFUSAL)
    # ...and the right keys are served, so the refusals above are about the keys.
    for url, key in ((fleet_up.server.ep.url("inference"), fleet_up.ts_key("inference")),
                     (fleet_up.router_url, router["inference"])):
        resp = requests.post(f"{url}/predictions/{MODEL}", data=body, headers={**json_type, **bearer(key)}, timeout=60)
        assert resp.status_code == 200 and resp.json()["intent"] == "travel", resp.text


def test_grpc_inference_with_a_management_or_admin_key_is_refused(fleet_up: Fleet) -> None:
    router = fleet_up.router_keys
    request = pb.PredictionsRequest(model_name=MODEL, input={"data": json.dumps({"text": "book me a flight"}).encode()})
    answers = {}
    for where, target in (("TorchServe", f"127.0.0.1:{fleet_up.server.ep.grpc_inference}"),
                          ("router", f"127.0.0.1:{fleet_up.grpc}")):
        with grpc.insecure_channel(target) as channel:
            stub = pb_grpc.InferenceAPIsServiceStub(channel)
            for who, key in (("no key", None), ("TorchServe management key", fleet_up.ts_key("management")),
                             ("router admin key", router["admin"])):
                metadata = (("authorization", f"Bearer {key}"),) if key is not None else ()
                try:
                    stub.Predictions(request, metadata=metadata, timeout=60)
                    answers[(where, who)] = "OK"
                except grpc.RpcError as exc:
                    answers[(where, who)] = exc.code().name
            good = router["inference"] if where == "router" else fleet_up.ts_key("inference")
            answer = stub.Predictions(request, metadata=(("authorization", f"Bearer {good}"),), timeout=60)
            assert json.loads(answer.prediction)["intent"] == "travel"
    assert answers == {k: "PERMISSION_DENIED" for k in answers}


# What TorchServe 0.12 answers (allowed_urls=^$, model_store the only place archives come from).
OUTSIDE_SOURCES = {
    "http://127.0.0.1:9/intent-classifier-1.0.mar": "Given URL http://127.0.0.1:9/intent-classifier-1.0.mar "
                                                    "does not match any allowed URL(s)",
    "https://example.com/x.mar": "Given URL https://example.com/x.mar does not match any allowed URL(s)",
    "file:///etc/passwd": "Given URL file:///etc/passwd does not match any allowed URL(s)",
    "../model_store/intent-classifier-1.0.mar": "Relative path is not allowed in url: "
                                                "../model_store/intent-classifier-1.0.mar",
    "sub/../intent-classifier-1.0.mar": "Relative path is not allowed in url: sub/../intent-classifier-1.0.mar",
}


@pytest.mark.parametrize("kind", ["models", "workflows"])
def test_registration_from_a_url_or_outside_model_store_is_refused(fleet_up: Fleet, tmp_path: Path,
                                                                    kind: str) -> None:
    # A real archive outside model_store, reached by an absolute path, a traversal and a file: URL.
    suffix = {"models": ".mar", "workflows": ".war"}[kind]
    archive = {"models": "intent-classifier-1.0.mar", "workflows": "intent-pipeline.war"}[kind]
    source = fleet_up.server.model_store / archive
    outside = tmp_path / f"elsewhere{suffix}"
    outside.write_bytes(source.read_bytes())
    not_found = {"models": "Model not found at: ", "workflows": "Workflow not found in workflow store: "}[kind]
    expected = {url.replace(".mar", suffix): message.replace(".mar", suffix)
                for url, message in OUTSIDE_SOURCES.items()}
    expected[str(outside)] = not_found + str(outside)
    expected["/etc/passwd"] = not_found + "/etc/passwd"
    traversal = f"{fleet_up.server.model_store}/../{outside.relative_to('/')}"
    expected[traversal] = f"Relative path is not allowed in url: {traversal}"
    expected[f"file://{outside}"] = f"Given URL file://{outside} does not match any allowed URL(s)"
    exception = {"models": "ModelNotFoundException", "workflows": "WorkflowNotFoundException"}[kind]
    name = {"models": "model_name", "workflows": "workflow_name"}[kind]

    before = models_state(fleet_up)
    answers = {}
    for url in expected:
        resp = fleet_up.management("POST", f"/{kind}", fleet_up.ts_key("management"),
                                   params={"url": url, name: "intruder"})
        answers[url] = (resp.status_code, resp.json())
    assert answers == {url: (404, {"code": 404, "type": exception, "message": message})
                       for url, message in expected.items()}
    assert models_state(fleet_up) == before


def test_every_listener_of_the_fleet_is_on_loopback(fleet_up: Fleet) -> None:
    listening: dict[int, str] = {}
    for proc in fleet_up.processes():
        try:
            conns = proc.net_connections(kind="inet")
        except psutil.NoSuchProcess:
            continue  # a log writer or worker that ended meanwhile listens nowhere
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                listening[conn.laddr.port] = conn.laddr.ip
    ep = fleet_up.server.ep
    wanted = {ep.inference, ep.management, ep.metrics, ep.grpc_inference, ep.grpc_management,
              fleet_up.rest, fleet_up.admin_port, fleet_up.grpc, fleet_up.recycler_port}
    assert wanted <= set(listening), sorted(wanted - set(listening))  # found them all: the check sees them
    # The JVM may take IPv4 loopback as its IPv6-mapped form: the same address.
    assert {port: ip for port, ip in listening.items() if ip.removeprefix("::ffff:") not in LOOPBACK} == {}


def test_key_files_are_readable_by_their_owner_only(fleet_up: Fleet) -> None:
    for path in (fleet_up.server.workdir / "key_file.json", fleet_up.workdir / "router_key.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def readable(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".gz":  # log4j2's rolled archives
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def test_no_key_shows_anywhere_but_in_the_key_files(fleet_up: Fleet) -> None:
    # Every key is used once (refused and taken ones, over REST to both servers), and a
    # rotation with a grace period leaves an older key: each could end up in a log line.
    router = fleet_up.router_keys
    body, json_type = json.dumps({"text": "cancel my order"}), {"Content-Type": "application/json"}
    for key in (router["inference"], router["admin"], fleet_up.ts_key("inference"), fleet_up.ts_key("management")):
        requests.post(f"{fleet_up.router_url}/predictions/{MODEL}", data=body, headers={**json_type, **bearer(key)},
                      timeout=60)
    rotated = fleet_up.admin("POST", "/keys/inference", router["admin"], json={"grace_s": 600})
    assert rotated.status_code == 200, rotated.text
    resp = requests.post(f"{fleet_up.router_url}/predictions/{MODEL}", data=body,
                         headers={**json_type, **bearer(router["inference"])}, timeout=60)
    assert resp.status_code == 200, resp.text  # the old key within its grace
    keys = fleet_up.every_key()
    assert router["inference"] in keys and len(keys) >= 6

    shown: dict[str, str] = {}
    for command in (["status"], ["status", "--json"], ["plan"], ["rollout", "status"]):
        shown[f"tsfleet {' '.join(command)}"] = fleet_up.tsfleet(*command)
    for url in (f"{fleet_up.router_url}/metrics", f"{fleet_up.router_url}/livez", f"{fleet_up.router_url}/readyz",
                f"{fleet_up.router_url}/readyz?models=all", f"{fleet_up.server.ep.url('metrics')}/metrics",
                f"http://127.0.0.1:{fleet_up.recycler_port}/metrics"):
        resp = requests.get(url, timeout=30)
        assert resp.status_code == 200, (url, resp.status_code)
        shown[url] = resp.text
    assert "tsfleet_router_requests_total" in shown[f"{fleet_up.router_url}/metrics"]
    # Every file the fleet wrote in its work folders (logs, rolled ones included, the state
    # file, pid files, TorchServe's temp files), but the key files themselves.
    key_files = {fleet_up.server.workdir / "key_file.json", fleet_up.workdir / "router_key.json"}
    files = [p for folder in (fleet_up.server.workdir, fleet_up.workdir) for p in folder.rglob("*")
             if p.is_file() and p not in key_files]
    assert fleet_up.workdir / "router_state.json" in files
    assert {"route.log", "recycle.log", "ts_log.log", "access_log.log"} <= {p.name for p in files}
    for path in files:
        shown[str(path)] = readable(path)
    for proc in fleet_up.processes():
        try:
            shown[f"pid {proc.pid} command line"] = " ".join(proc.cmdline())
        except psutil.NoSuchProcess:
            pass
    assert any("tsfleet" in text and "route" in text for where, text in shown.items() if "command line" in where)
    leaks = sorted((where, key[:4] + "...") for where, text in shown.items() for key in keys if key in text)
    assert leaks == []
