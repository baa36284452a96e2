"""Readiness by model (``/readyz?models=...``, gRPC health naming a model) against the
session's TorchServe: a model whose traffic goes to a version with no worker makes the
probe fail, naming it, while the other models stay ready; a candidate without workers does
not (its requests are retried on the other arm); the probe recovers with the workers."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import grpc
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.router_harness import RunningRouter
from tests.polling import wait_for
from tsfleet.manifest import Fleet
from tsfleet.control.server import TorchServe

pytestmark = pytest.mark.slow
INTENT = "intent-classifier"
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def router(fleet: Fleet, server: TorchServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRouter]:
    with RunningRouter.before(server, fleet, tmp_path_factory.mktemp("router")) as r:
        yield r


def ready(router: RunningRouter, query: str) -> requests.Response:
    return requests.get(f"{router.url}/readyz{query}", timeout=10)


def check(router: RunningRouter, service: str) -> int:
    with grpc.insecure_channel(router.grpc_target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def wait_all_ready(server: TorchServe, model: str) -> None:
    wait_for(f"every version of {model} to have a ready worker",
             lambda: all(v.ready_workers for v in server.client.describe(model)), timeout=120, interval=0.2)


def test_every_model_ready_names_where_its_traffic_goes(router: RunningRouter, server: TorchServe, fleet: Fleet) -> None:
    wait_all_ready(server, INTENT)
    resp = ready(router, "?models=all")
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["status"] == "ready" and doc["torchserve"] == server.ep.url("inference")
    assert set(doc["models"]) == set(fleet.models)
    for name, model in fleet.models.items():
        assert list(doc["models"][name]) == [model.default_version]
        assert doc["models"][name][model.default_version] >= 1
    # The plain probe is unchanged: TorchServe answers.
    plain = ready(router, "")
    assert (plain.status_code, plain.json()) == (200, {"status": "ready", "torchserve": server.ep.url("inference")})
    assert check(router, INTENT) == SERVING


def test_a_model_without_a_worker_where_its_traffic_goes_is_not_ready(router: RunningRouter,
                                                                       server: TorchServe) -> None:
    wait_all_ready(server, INTENT)
    try:
        server.client.scale(INTENT, "1.1", 0)
        # A candidate with no worker: its requests are retried on 1.0, so the model is still served.
        router.table.set_weights(INTENT, {"1.0": 90, "1.1": 10}, baseline="1.0")
        resp = wait_for("1.1's workers to be gone from the probe's answer", lambda: _without_workers(router, "1.1"),
                        timeout=30)
        assert resp.status_code == 200 and resp.json()["models"][INTENT]["1.0"] >= 1, resp.text

        router.table.set_weights(INTENT, {"1.1": 100}, baseline="1.1")  # now all of it goes to 1.1
        resp, = wait_for("the probe to see it", lambda: _status(router, f"?models={INTENT},image-classifier", 503),
                         timeout=10)
        doc = resp.json()
        assert doc["type"] == "ServiceUnavailable"
        assert doc["message"] == f"not ready: {INTENT}: no worker ready on 1.1 (0 ready)"
        assert doc["models"][INTENT] == {"1.1": 0} and doc["models"]["image-classifier"]["1.0"] >= 1
        assert ready(router, "?models=image-classifier").status_code == 200  # the other models are not held back
        assert ready(router, "").status_code == 200  # nor the plain probe
        assert check(router, INTENT) == NOT_SERVING
        assert check(router, "image-classifier") == SERVING

        server.client.scale(INTENT, "1.1", 1)
        resp, = wait_for("the probe to recover", lambda: _status(router, "?models=all", 200), timeout=10)
        assert resp.json()["models"][INTENT]["1.1"] == 1
        assert check(router, INTENT) == SERVING
    finally:
        router.table.set_weights(INTENT, {"1.0": 100}, baseline="1.0")
        server.client.scale(INTENT, "1.1", 1)
        wait_all_ready(server, INTENT)


def _without_workers(router: RunningRouter, version: str) -> requests.Response | None:
    resp = ready(router, f"?models={INTENT}")
    return resp if resp.json().get("models", {}).get(INTENT, {}).get(version) == 0 else None


def _status(router: RunningRouter, query: str, status: int) -> tuple[requests.Response] | None:
    resp = ready(router, query)
    return (resp,) if resp.status_code == status else None  # in a tuple: a 503 response is falsy


@pytest.mark.parametrize("query, status, words", [
    ("?models=", 400, "/readyz takes one query parameter, models"),
    ("?model=all", 400, "/readyz takes one query parameter, models"),
    ("?models=all&models=x", 400, "/readyz takes one query parameter, models"),
    ("?models=nope,intent-classifier", 404, "unknown model(s) 'nope': the router routes image-classifier, "
                                            "intent-classifier, text-embedder"),
])
def test_a_probe_asking_wrongly_gets_a_4xx_naming_the_problem(router: RunningRouter, query: str, status: int,
                                                              words: str) -> None:
    resp = ready(router, query)
    assert resp.status_code == status and words in resp.json()["message"], resp.text
    assert resp.json()["code"] == status


def test_grpc_health_knows_models_and_nothing_else(router: RunningRouter) -> None:
    with pytest.raises(grpc.RpcError) as err:
        check(router, "nope")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "and the models it routes" in err.value.details()


def test_a_router_without_torchserve_s_keys_says_why_it_cannot_tell(fleet: Fleet, server: TorchServe,
                                                                   tmp_path: Path) -> None:
    with RunningRouter.before(server, fleet, tmp_path, keyed=False) as r:
        resp = ready(r, "?models=all")
    assert resp.status_code == 503
    assert "started without TorchServe's key file (--key-file)" in resp.json()["message"], resp.text
