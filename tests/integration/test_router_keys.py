"""The router's own inference key against a real TorchServe whose keys expire in seconds:
clients that send it keep being answered, over REST and gRPC, after TorchServe's key has
expired and been renewed, by the router or behind its back."""
from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Iterator

import grpc
import pytest
import requests
import yaml

from tests.integration.conftest import ROOT, new_server
from tests.integration.router_harness import RunningRouter
from tests.polling import wait_for
from tsfleet.manifest import Fleet, parse_fleet
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc
from tsfleet.control.server import Keys, TorchServe

pytestmark = pytest.mark.slow
MODEL = "image-classifier"
SHAPE = (ROOT / "docs" / "shape.png").read_bytes()  # a triangle
LIFETIME_MIN = 0.25  # TorchServe's keys last 15 s here (60 minutes by default)


def image_only_fleet() -> Fleet:
    doc = yaml.safe_load((ROOT / "fleet.yaml").read_text())
    doc["models"] = {MODEL: copy.deepcopy(doc["models"][MODEL])}
    doc["workflows"] = {}
    return parse_fleet(doc, ROOT)


@pytest.fixture(scope="module")
def fleet_of_one() -> Fleet:
    return image_only_fleet()


@pytest.fixture(scope="module")
def server(fleet_of_one: Fleet, model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    ts = new_server(fleet_of_one, model_store, tmp_path_factory.mktemp("short-keys"))
    with ts.config.open("a") as fh:
        fh.write(f"token_expiration_min={LIFETIME_MIN}\n")
    ts.start(snapshots=False)
    try:
        ts.wait_ready(fleet_of_one, timeout=300, progress=lambda line: None)
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="module")
def router(fleet_of_one: Fleet, server: TorchServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRouter]:
    with RunningRouter.before(server, fleet_of_one, tmp_path_factory.mktemp("router")) as r:
        yield r


def torchserve_keys(server: TorchServe) -> Keys:
    return wait_for("a readable key_file.json", lambda: _keys_or_none(server), timeout=10)


def _keys_or_none(server: TorchServe) -> Keys | None:
    try:
        return Keys.load(server.workdir / "key_file.json")
    except (OSError, ValueError, KeyError):
        return None  # being rewritten


def router_key(router: RunningRouter) -> str:
    return json.loads((router.process.config.key_file).read_text())["inference"]


def rest(router: RunningRouter, key: str) -> requests.Response:
    return router.post(f"/predictions/{MODEL}", SHAPE, {"Authorization": f"Bearer {key}", "Content-Type": "image/png"})


def grpc_label(router: RunningRouter, key: str) -> str:
    with grpc.insecure_channel(router.grpc_target) as channel:
        reply = pb_grpc.InferenceAPIsServiceStub(channel).Predictions(
            pb.PredictionsRequest(model_name=MODEL, input={"data": SHAPE}),
            metadata=[("authorization", f"Bearer {key}")], timeout=60)
    return json.loads(reply.prediction)["label"]


def test_the_router_s_key_outlives_torchserve_s(server: TorchServe, router: RunningRouter) -> None:
    key, keys = router_key(router), router.process.keys
    assert keys is not None
    # A key with all its 15 s ahead (the one TorchServe started with may be spent by now).
    renew_behind_the_router_s_back(server)
    answer = rest(router, key)
    assert answer.status_code == 200 and answer.json()["label"] == "triangle", answer.text
    assert grpc_label(router, key) == "triangle"
    first, refusals = torchserve_keys(server), keys.refusals
    assert key != first.inference

    # TorchServe's key expires; the router renews it before it does, so nothing is refused.
    wait_for("the router to renew TorchServe's inference key",
             lambda: torchserve_keys(server).inference != first.inference, timeout=LIFETIME_MIN * 60 * 3)
    stale = requests.post(server.ep.url("inference") + f"/predictions/{MODEL}", data=SHAPE, timeout=60,
                          headers={**first.header("inference"), "Content-Type": "image/png"})
    assert stale.status_code == 400 and "Token Authorization failed" in stale.text  # the old key is dead

    answer = rest(router, key)
    assert answer.status_code == 200 and answer.json()["label"] == "triangle", answer.text
    assert grpc_label(router, key) == "triangle"
    assert keys.refusals == refusals  # renewed ahead: no request had to be sent twice
    # TorchServe's own current key still passes through as it is.
    assert rest(router, torchserve_keys(server).inference).json()["label"] == "triangle"
    # What an alert on failing renewals would watch: never below zero while they work.
    metrics = router.session.get(router.url + "/metrics", timeout=10).text
    left = [float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith("tsfleet_router_torchserve_key_expires_in_seconds ")]
    assert len(left) == 1 and 0 < left[0] <= LIFETIME_MIN * 60, metrics[-400:]


def test_readiness_by_model_outlives_torchserve_s_management_key(server: TorchServe, router: RunningRouter,
                                                                  fleet_of_one: Fleet) -> None:
    ready = {MODEL: {"1.0": fleet_of_one.models[MODEL].versions["1.0"].serving.workers}}  # the workers fleet.yaml ships

    def probe() -> requests.Response:
        return requests.get(f"{router.url}/readyz?models=all", timeout=10)

    first = probe()
    assert first.status_code == 200 and first.json()["models"] == ready, first.text
    key = torchserve_keys(server).management

    def refused() -> bool:
        resp = requests.get(server.ep.url("management") + "/models", headers={"Authorization": f"Bearer {key}"},
                            timeout=10)
        return resp.status_code in (400, 401)

    wait_for("TorchServe to refuse the management key the probe used", refused,
             timeout=LIFETIME_MIN * 60 * 3, interval=0.5)
    again = probe()  # the router's management client renews the key it was refused, as the CLI does
    assert again.status_code == 200 and again.json()["models"] == ready, again.text


def renew_behind_the_router_s_back(server: TorchServe) -> None:
    keys = torchserve_keys(server)
    resp = requests.get(server.ep.url("management") + "/token", params={"type": "inference"},
                        headers=keys.header("api"), timeout=30)
    assert resp.status_code == 200, resp.text
    assert torchserve_keys(server).inference != keys.inference


def test_a_key_renewed_elsewhere_is_taken_up_without_a_failure(server: TorchServe, router: RunningRouter) -> None:
    key, keys = router_key(router), router.process.keys
    assert keys is not None and router.process._fresh is not None
    # Without its timely check the router learns of each renewal from TorchServe's refusal.
    router.loop.loop.call_soon_threadsafe(router.process._fresh.cancel)
    renew_behind_the_router_s_back(server)
    refusals = keys.refusals
    answer = rest(router, key)
    assert answer.status_code == 200 and answer.json()["label"] == "triangle", answer.text
    renew_behind_the_router_s_back(server)
    assert grpc_label(router, key) == "triangle"
    ping = router.session.get(router.url + "/ping", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert ping.status_code == 200 and ping.json()["status"] == "Healthy"
    assert keys.refusals - refusals == 2  # the prediction over REST, then the one over gRPC


def test_a_wrong_key_gets_torchserve_s_refusal(server: TorchServe, router: RunningRouter) -> None:
    answer = rest(router, "not-a-key")
    assert answer.status_code == 400 and "Token Authorization failed" in answer.text
    with pytest.raises(grpc.RpcError) as err:
        grpc_label(router, "not-a-key")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def rotate(router: RunningRouter, grace_s: float) -> str:
    """`tsfleet rotate-key` against this router: the new key, as the command prints it."""
    out = subprocess.run([sys.executable, "-m", "tsfleet", "--router-admin", router.admin_url,
                          "--router-key-file", str(router.process.config.key_file), "rotate-key",
                          "--grace-s", str(grace_s)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_rotated_key_is_taken_at_once_and_the_old_one_for_its_grace(server: TorchServe, router: RunningRouter) -> None:
    old = router_key(router)
    bad = router.admin("POST", "/keys/inference", json={"grace_s": -1})
    assert bad.status_code == 400 and "grace_s" in bad.json()["message"] and router_key(router) == old
    new = rotate(router, grace_s=600)
    assert new == router_key(router) != old
    assert rest(router, new).json()["label"] == "triangle"
    assert grpc_label(router, new) == "triangle"
    assert rest(router, old).json()["label"] == "triangle"  # clients have 600 s to move over

    newer = rotate(router, grace_s=0)
    assert rest(router, newer).json()["label"] == "triangle"
    for gone in (old, new):
        refused = rest(router, gone)
        assert refused.status_code == 400 and "Token Authorization failed" in refused.text
    assert json.loads(router.process.config.key_file.read_text())["inference"] == newer  # kept for a restart


def test_rotation_is_refused_with_a_reason_when_the_router_swaps_no_keys(fleet_of_one: Fleet, server: TorchServe,
                                                                         tmp_path: Path) -> None:
    plain = RunningRouter(fleet_of_one, tmp_path, server.ep.url("inference"), f"127.0.0.1:{server.ep.grpc_inference}")
    try:
        resp = plain.admin("POST", "/keys/inference", json={"grace_s": 0})
        assert resp.status_code == 409 and "--key-file" in resp.json()["message"]
    finally:
        plain.stop()


def test_an_expired_management_key_is_refused_and_changes_nothing(server: TorchServe, fleet_of_one: Fleet) -> None:
    # TorchServe's management key expires like its inference key (15 s here); once it has, a
    # call with it is refused whatever it asks, and a key renewed through the token API works.
    url, old = server.ep.url("management"), torchserve_keys(server)
    doc = json.loads((server.workdir / "key_file.json").read_text())
    expires = datetime.fromisoformat(doc["management"]["expiration time"]).timestamp()
    wait_for("the management key's expiry", lambda: time.time() > expires + 1, timeout=LIFETIME_MIN * 60 + 30)
    before = requests.get(url + "/models", headers=old.header("api"), timeout=30)  # the API key: not management's
    for method, path, params in (("GET", "/models", {}), ("PUT", f"/models/{MODEL}", {"min_worker": 2}),
                                 ("DELETE", f"/models/{MODEL}/1.0", {})):
        resp = requests.request(method, url + path, params=params, headers=old.header("management"), timeout=30)
        assert resp.status_code == 400 and resp.json()["message"] == (
            "Token Authorization failed. Token either incorrect, expired, or not provided correctly"), resp.text
    renewed = requests.get(url + "/token", params={"type": "management"}, headers=old.header("api"), timeout=30)
    assert renewed.status_code == 200, renewed.text
    fresh = torchserve_keys(server)
    assert fresh.management != old.management
    models = requests.get(url + f"/models/{MODEL}", headers=fresh.header("management"), timeout=30)
    assert models.status_code == 200 and [v["modelVersion"] for v in models.json()] == ["1.0"]
    assert len(models.json()[0]["workers"]) == fleet_of_one.models[MODEL].versions["1.0"].serving.workers
    assert before.status_code == 400  # the token-API key opens no management call either
