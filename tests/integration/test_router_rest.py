"""The A/B router over REST, in front of a real TorchServe."""
from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.integration.conftest import free_ports
from tests.integration.router_harness import Forwarder, RunningRouter, camera_image
from tests.prometheus_text import value
from tsfleet.router.policy.compare import answers_agree
from tsfleet.router.policy.routing import RollbackRule
from tsfleet.control.server import TorchServe

pytestmark = pytest.mark.slow
INTENT = "intent-classifier"
NEVER = RollbackRule(max_error_rate_increase=1.0, max_p99_ratio=0)


@pytest.fixture(scope="module")
def router(fleet, server: TorchServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRouter]:
    r = RunningRouter(fleet, tmp_path_factory.mktemp("router"), server.ep.url("inference"),
                      f"127.0.0.1:{server.ep.grpc_inference}")
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(autouse=True)
def reset_routes(router: RunningRouter, server: TorchServe) -> Iterator[None]:
    # Other tests kill and scale workers of the session's server: start from ready versions.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if all(v.ready_workers for v in server.client.describe(INTENT)):
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"{INTENT}: a version still has no ready worker after 90 s")
    # Each test starts with fresh statistics and no automatic rollback, so a latency blip on
    # a shared 2-core box cannot move traffic mid-test; the rollback test sets its own rule.
    router.table.stats.clear()
    router.table.routes[INTENT].rollback = NEVER
    yield
    router.table.set_weights(INTENT, {"1.0": 100}, baseline="1.0")
    router.table.set_shadow(INTENT, None, 0)


def body(text: str) -> bytes:
    return json.dumps({"text": text}).encode()


def test_answers_like_torchserve_and_names_the_version(router, client, headers) -> None:
    direct = client.predict(INTENT, {"text": "book me a flight to Rome"})
    routed = router.post(f"/predictions/{INTENT}", body("book me a flight to Rome"), headers)
    assert routed.status_code == 200 and routed.json() == direct.json()
    assert routed.headers["X-Model-Version"] == "1.0"
    assert routed.headers["Content-Type"].startswith("application/json")
    pipe = router.post("/wfpredict/intent-pipeline", body("what's the weather tomorrow"), headers)
    assert pipe.status_code == 200 and pipe.json()["intent"] == "weather"


def test_a_fleet_workflow_torchserve_has_not_registered_yet_is_a_503_not_a_404(router, server, fleet, headers) -> None:
    # Between a restarted TorchServe's start and `up` registering the workflow again, TorchServe
    # answers 404 WorkflowNotFoundException: a client must read "not yet", not "no such thing".
    server.client.unregister_workflow("intent-pipeline")
    try:
        direct = requests.post(server.ep.url("inference") + "/wfpredict/intent-pipeline", data=body("hello"),
                               headers=headers, timeout=60)
        assert direct.status_code == 404 and direct.json()["type"] == "WorkflowNotFoundException"
        routed = router.post("/wfpredict/intent-pipeline", body("hello"), headers)
        assert routed.status_code == 503 and routed.json() == {
            "code": 503, "type": "ServiceUnavailable",
            "message": f"workflow intent-pipeline is not registered in TorchServe at {server.ep.url('inference')} "
                       "yet (started again?); try again shortly"}
        # A workflow the fleet does not declare is TorchServe's 404, as it is.
        other = router.post("/wfpredict/no-such-pipeline", body("hello"), headers)
        assert other.status_code == 404 and other.json()["type"] == "WorkflowNotFoundException"
    finally:
        server.register_workflows(fleet)
    pipe = router.post("/wfpredict/intent-pipeline", body("what's the weather tomorrow"), headers)
    assert pipe.status_code == 200 and pipe.json()["intent"] == "weather"


def test_a_camera_sized_image_gets_torchserve_s_answer(router, server) -> None:
    image = camera_image()
    assert len(image) > 300_000
    headers = {**server.keys.header("inference"), "Content-Type": "image/jpeg"}
    direct = requests.post(server.ep.url("inference") + "/predictions/image-classifier", data=image,
                           headers=headers, timeout=60)
    routed = router.post("/predictions/image-classifier", image, headers)
    assert direct.status_code == routed.status_code == 200
    assert routed.json()["label"] == "triangle" and answers_agree(routed.content, direct.content)


def test_weighted_split_over_real_requests(router, headers) -> None:
    router.admin("PUT", f"/routes/{INTENT}", json={"weights": {"1.0": 90, "1.1": 10}}).raise_for_status()
    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(lambda i: router.post(f"/predictions/{INTENT}", body(f"hello number {i}"), headers),
                            range(1000)))
    assert all(r.status_code == 200 for r in got)
    share = Counter(r.headers["X-Model-Version"] for r in got)["1.1"] / len(got)
    stats = router.table.stats[(INTENT, "1.1")]
    assert abs(share - 0.10) <= 0.015, (share, stats.errors, stats.retries, router.table.routes[INTENT])


def test_sticky_users_stay_and_only_movers_move(router, headers) -> None:
    router.admin("PUT", f"/routes/{INTENT}", json={"weights": {"1.0": 90, "1.1": 10}}).raise_for_status()

    def arms() -> dict[str, str]:
        out = {}
        for user in range(150):
            seen = {router.post(f"/predictions/{INTENT}", body("hi there"), {**headers, "X-User-Id": f"u{user}"})
                    .headers["X-Model-Version"] for _ in range(2)}
            assert len(seen) == 1, (user, seen)  # never changes arm while weights are constant
            out[f"u{user}"] = seen.pop()
        return out

    before = arms()
    router.admin("PUT", f"/routes/{INTENT}", json={"weights": {"1.0": 80, "1.1": 20}}).raise_for_status()
    after = arms()
    moved = [u for u in before if before[u] != after[u]]
    assert all(before[u] == "1.0" and after[u] == "1.1" for u in moved)  # nobody moved back
    assert Counter(after.values())["1.1"] > Counter(before.values())["1.1"]


def test_explicit_version_always_wins(router, headers) -> None:
    router.admin("PUT", f"/routes/{INTENT}", json={"weights": {"1.0": 100}}).raise_for_status()
    resp = router.post(f"/predictions/{INTENT}/1.1", body("refund my payment"), {**headers, "X-User-Id": "u1"})
    assert resp.status_code == 200 and resp.headers["X-Model-Version"] == "1.1"


@pytest.mark.parametrize("path,payload,ctype", [
    (f"/predictions/{INTENT}", b'{"text": ', "application/json"),
    (f"/predictions/{INTENT}", b'{"txt": "x"}', "application/json"),
    ("/predictions/image-classifier", b"not an image", "image/png"),
    ("/predictions/no-such-model", b'{"text": "x"}', "application/json"),
    (f"/predictions/{INTENT}/9.9", b'{"text": "x"}', "application/json"),
])
def test_malformed_requests_get_the_same_4xx_as_torchserve(router, client, server, path, payload, ctype) -> None:
    hdrs = {**server.keys.header("inference"), "Content-Type": ctype}
    direct = requests.post(client.inference_url + path, data=payload, headers=hdrs, timeout=30)
    routed = router.post(path, payload, hdrs)
    assert 400 <= direct.status_code < 500
    assert (routed.status_code, routed.json()) == (direct.status_code, direct.json())
    metrics = requests.get(router.url + "/metrics", timeout=10).text
    assert 'model="no-such-model"' not in metrics and 'version="9.9"' not in metrics  # made-up names: no series


@pytest.mark.parametrize("method,path", [("GET", "/no-such-path"), ("POST", "/predictions"),
                                         ("POST", f"/predictions/{INTENT}/1.0/extra")])
def test_other_paths_get_torchserve_s_own_answer(router, client, server, method, path) -> None:
    hdrs = {**server.keys.header("inference"), "Content-Type": "application/json"}
    direct = requests.request(method, client.inference_url + path, data=b"{}", headers=hdrs, timeout=30)
    routed = requests.request(method, router.url + path, data=b"{}", headers=hdrs, timeout=30)
    assert direct.status_code >= 400
    assert (routed.status_code, routed.text) == (direct.status_code, direct.text)


def test_chunked_request_bodies_are_answered(router, headers) -> None:
    def pieces():  # requests sends a generator as Transfer-Encoding: chunked
        yield b'{"text": "book me a '
        yield b'flight to Rome"}'

    resp = requests.post(router.url + f"/predictions/{INTENT}", data=pieces(), headers=headers, timeout=30)
    assert resp.status_code == 200 and resp.json()["intent"] == "travel", resp.text


def test_missing_token_is_refused_as_by_torchserve(router) -> None:
    resp = router.post(f"/predictions/{INTENT}", body("hi"), {"Content-Type": "application/json"})
    assert resp.status_code in (400, 401) and "Token Authorization failed" in resp.json()["message"]


def test_shadow_mirrors_and_counts_disagreement(router, client, headers) -> None:
    # The last sentence is none of the intents: there the two versions decide differently,
    # so the count below is not zero and a router that never counts a disagreement fails.
    distinct = ["book a flight", "my invoice is wrong", "hello!", "cancel it all", "rain tomorrow?",
                "the cat sat on the mat"]
    texts = distinct * 4
    # Each version's own decision, straight from TorchServe: a disagreement is a different intent.
    decided = {(t, v): client.predict(INTENT, {"text": t}, version=v).json()["intent"]
               for t in distinct for v in ("1.0", "1.1")}
    expected = sum(decided[(t, "1.0")] != decided[(t, "1.1")] for t in texts)
    assert 0 < expected < len(texts), decided
    router.admin("PUT", f"/routes/{INTENT}", json={"shadow": {"version": "1.1", "share": 1.0}}).raise_for_status()
    for text in texts:
        resp = router.post(f"/predictions/{INTENT}", body(text), headers)
        assert resp.headers["X-Model-Version"] == "1.0"  # the client only ever sees the primary
        assert resp.json()["intent"] == decided[(text, "1.0")]
    deadline = time.monotonic() + 30
    while router.table.stats[(INTENT, "1.1")].shadow_requests < len(texts) and time.monotonic() < deadline:
        time.sleep(0.05)
    st = router.table.stats[(INTENT, "1.1")]
    assert (st.shadow_requests, st.shadow_errors, st.shadow_disagreements) == (len(texts), 0, expected), decided
    assert st.requests == 0  # the shadow's answers never reach a client
    # The same counts where an operator's dashboard reads them.
    metrics = requests.get(router.url + "/metrics", timeout=10).text
    arm = {"model": "intent-classifier", "version": "1.1"}
    assert value(metrics, "tsfleet_router_shadow_requests_total", **arm) == len(texts)
    assert value(metrics, "tsfleet_router_shadow_disagreements_total", **arm) == expected


def test_admin_api_needs_its_token_and_validates(router) -> None:
    assert requests.get(router.admin_url + "/routes", timeout=10).status_code == 401
    assert router.admin("PUT", f"/routes/{INTENT}", json={"weights": {"1.0": 150}}).status_code == 400
    assert router.admin("PUT", "/routes/ghost", json={"weights": {"1.0": 1}}).status_code == 404
    assert router.admin("PUT", f"/routes/{INTENT}", data=b"{").status_code == 400
    assert router.admin("GET", "/routes").json()[INTENT]["weights"] == {"1.0": 100}


def test_a_worker_killed_mid_request_never_reaches_clients(router, server, headers) -> None:
    worker_pid = server.client.describe("text-embedder")[0].workers[0].pid
    texts = [f"sentence {i} for a worker that is about to die" for i in range(120)]

    def call(i: int) -> int:
        if i == 20:
            os.kill(worker_pid, signal.SIGKILL)
        return router.post("/predictions/text-embedder", body(texts[i]), headers).status_code

    before = router.table.stats.get(("text-embedder", "1.0"))
    retries_before = before.retries if before else 0
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(call, range(len(texts))))
    assert codes == [200] * len(texts)
    assert router.table.stats[("text-embedder", "1.0")].retries > retries_before


def test_failing_candidate_is_rolled_back_and_baseline_clients_see_no_errors(router, server, headers) -> None:
    router.table.routes[INTENT].rollback = RollbackRule(window_s=60, min_samples=15, max_error_rate_increase=0.05,
                                                        max_p99_ratio=0)
    router.admin("PUT", f"/routes/{INTENT}", json={"weights": {"1.0": 50, "1.1": 50}}).raise_for_status()
    server.client.scale(INTENT, "1.1", 0)  # the candidate can no longer answer
    try:
        got = [router.post(f"/predictions/{INTENT}", body(f"hi {i}"), headers) for i in range(120)]
        baseline = [r for r in got if r.headers.get("X-Model-Version") == "1.0"]
        assert baseline and all(r.status_code == 200 for r in baseline)
        route = router.admin("GET", "/routes").json()[INTENT]
        assert route["weights"]["1.1"] == 0 and route["rolled_back"]["version"] == "1.1"
        assert "error rate" in route["rolled_back"]["reason"]
        assert all(r.status_code == 200 for r in got[-40:])  # after the rollback, all on the baseline
    finally:
        server.client.scale(INTENT, "1.1", 1)


def test_weights_survive_a_router_restart(fleet, server, tmp_path: Path) -> None:
    first = RunningRouter(fleet, tmp_path, server.ep.url("inference"), f"127.0.0.1:{server.ep.grpc_inference}")
    first.admin("PUT", f"/routes/{INTENT}", json={"weights": {"1.0": 70, "1.1": 30}}).raise_for_status()
    first.stop()
    second = RunningRouter(fleet, tmp_path, server.ep.url("inference"), f"127.0.0.1:{server.ep.grpc_inference}")
    try:
        assert second.admin("GET", "/routes").json()[INTENT]["weights"] == {"1.0": 70.0, "1.1": 30.0}
        assert oct((tmp_path / "router_key.json").stat().st_mode & 0o777) == "0o600"
    finally:
        second.stop()


def test_torchserve_down_is_a_clear_503_until_it_comes_back(fleet, server, tmp_path: Path) -> None:
    port = free_ports(1)[0]
    r = RunningRouter(fleet, tmp_path, f"http://127.0.0.1:{port}", f"127.0.0.1:{port}")
    back = None
    try:
        resp = r.post(f"/predictions/{INTENT}", body("hi"), server.keys.header("inference"))
        assert resp.status_code == 503
        assert resp.json()["type"] == "ServiceUnavailable" and f"127.0.0.1:{port}" in resp.json()["message"]
        # The router's own probes need no key: alive, but not ready while TorchServe is away.
        live, ready = (requests.get(r.url + path, timeout=10) for path in ("/livez", "/readyz"))
        assert (live.status_code, live.json()) == (200, {"status": "alive"})
        assert ready.status_code == 503
        assert f"not ready: TorchServe is not reachable at http://127.0.0.1:{port}" in ready.json()["message"]

        back = r.loop.run(Forwarder(server.ep.inference).start(port))  # TorchServe answers at the address again
        ready = requests.get(r.url + "/readyz", timeout=10)
        assert (ready.status_code, ready.json()) == (200, {"status": "ready", "torchserve": f"http://127.0.0.1:{port}"})
        resp = r.post(f"/predictions/{INTENT}", body("book me a flight to Rome"), server.keys.header("inference"))
        assert resp.status_code == 200 and resp.json()["intent"] == "travel"
    finally:
        if back is not None:
            r.loop.run(back.close())
        r.stop()
