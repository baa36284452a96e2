"""The gRPC router in front of a real TorchServe: clients from TorchServe's inference.proto
work unchanged, traffic splits and sticks as routed, errors pass through (an unknown model
NOT_FOUND where TorchServe says INTERNAL), a
request a dying worker dropped is retried, and a shadow is mirrored and compared."""
from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import ROOT, free_ports
from tests.integration.router_harness import Forwarder, LoopThread, camera_image
from tsfleet.router.policy.compare import answers_agree
from tsfleet.router.fronts.grpc_front import start_grpc_router, stop_grpc_router
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc
from tsfleet.router.policy.manifest_routes import routes_from_fleet
from tsfleet.router.policy.routing import RollbackRule, RoutingTable

MODEL = "intent-classifier"
ROME = b'{"text": "book a flight to Rome"}'
HELDOUT = [json.loads(line)["text"] for line in (ROOT / "data/intents/heldout.jsonl").read_text().splitlines()]
SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"  # what a readiness probe names
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
NEVER = RollbackRule(max_error_rate_increase=1.0, max_p99_ratio=0)


def request(model: str = MODEL, data: bytes = ROME, version: str = "", **kw: Any) -> pb.PredictionsRequest:
    return pb.PredictionsRequest(model_name=model, model_version=version, input={"data": data}, **kw)


def outcome(call: Any) -> tuple[grpc.StatusCode, str, bytes | None]:
    """(status, details, prediction) of a unary call, so direct and routed answers compare."""
    try:
        reply, rpc = call()
        return rpc.code(), rpc.details() or "", reply.prediction
    except grpc.RpcError as err:
        return err.code(), err.details() or "", None


class Router:
    """One router (fresh routing table) and a client channel to it."""

    def __init__(self, loop: LoopThread, table: RoutingTable, upstream: str):
        self.loop, self.table = loop, table
        self.server, self.port = loop.run(start_grpc_router(table, upstream))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = pb_grpc.InferenceAPIsServiceStub(self.channel)

    def drain(self) -> None:
        self.loop.run(self.server.drain(timeout=30))

    def close(self) -> None:
        self.channel.close()
        self.loop.run(stop_grpc_router(self.server, grace=1))


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@pytest.fixture(scope="module")
def upstream(server) -> str:
    return f"127.0.0.1:{server.ep.grpc_inference}"


@pytest.fixture(scope="module")
def auth(server) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {server.keys.inference}"),)


@pytest.fixture(scope="module")
def direct(upstream: str) -> Iterator[pb_grpc.InferenceAPIsServiceStub]:
    with grpc.insecure_channel(upstream) as channel:
        yield pb_grpc.InferenceAPIsServiceStub(channel)


@pytest.fixture
def router(loop: LoopThread, upstream: str, fleet) -> Iterator[Router]:
    routes = routes_from_fleet(fleet)
    for route in routes.values():
        # No automatic rollback unless a test sets its own rule: a latency blip on a shared
        # 2-core box (p99 332 ms vs 153 ms once in CI) must not move traffic mid-split.
        route.rollback = NEVER
    r = Router(loop, RoutingTable(routes), upstream)
    yield r
    r.close()


def version_of(call: Any) -> str | None:
    return dict(call.initial_metadata()).get("x-model-version")


def test_generated_code_matches_the_proto(tmp_path: Path) -> None:
    """The committed *_pb2 files are what the pinned grpcio-tools makes of inference.proto."""
    import sysconfig
    proto = "tsfleet/router/proto/inference.proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"-I{sysconfig.get_paths()['purelib']}",
                    f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", proto], cwd=ROOT, check=True)
    for name in ("inference_pb2.py", "inference_pb2_grpc.py"):
        assert filecmp.cmp(tmp_path / "tsfleet/router/proto" / name, ROOT / "tsfleet/router/proto" / name,
                           shallow=False), f"{name} is stale: regenerate it (tsfleet/router/proto/README.md)"


def test_client_from_the_proto_talks_to_torchserve(direct, auth) -> None:
    reply = direct.Predictions(request(), metadata=auth, timeout=30)
    assert json.loads(reply.prediction)["intent"] == "travel"
    assert json.loads(direct.Ping(empty_pb2.Empty(), metadata=auth, timeout=30).health)["status"] == "Healthy"


def test_router_gives_the_same_answer_and_names_the_version(router, direct, auth) -> None:
    reply, call = router.stub.Predictions.with_call(request(), metadata=auth, timeout=30)
    assert version_of(call) == "1.0"
    assert json.loads(reply.prediction)["intent"] == "travel"
    assert answers_agree(reply.prediction, direct.Predictions(request(), metadata=auth, timeout=30).prediction)
    assert router.stub.Ping(empty_pb2.Empty(), metadata=auth, timeout=30) == \
        direct.Ping(empty_pb2.Empty(), metadata=auth, timeout=30)


def test_a_camera_sized_image_gets_torchserve_s_answer(router, direct, auth) -> None:
    image = request("image-classifier", camera_image())
    assert image.ByteSize() > 300_000
    reply, call = router.stub.Predictions.with_call(image, metadata=auth, timeout=60)
    assert version_of(call) == "1.0" and json.loads(reply.prediction)["label"] == "triangle"
    assert answers_agree(reply.prediction, direct.Predictions(image, metadata=auth, timeout=60).prediction)


def test_weights_split_traffic_exactly(router, auth) -> None:
    router.table.set_weights(MODEL, {"1.0": 90, "1.1": 10})
    seen: Counter[str] = Counter()
    for start in range(0, 1000, 50):  # 50 in flight: well inside TorchServe's job queue
        calls = [router.stub.Predictions.future(request(data=b'{"text": "hi"}'), metadata=auth, timeout=60)
                 for _ in range(50)]
        for call in calls:
            call.result()
            seen[version_of(call)] += 1
    assert seen == {"1.0": 900, "1.1": 100}  # smooth weighted round robin: exact, not just +-3 points
    assert router.table.stats[(MODEL, "1.1")].requests == 100


def test_sticky_user_stays_on_one_version(router, auth) -> None:
    router.table.set_weights(MODEL, {"1.0": 50, "1.1": 50})
    users = [f"user-{i}" for i in range(30)]
    per_user: dict[str, set[str]] = {u: set() for u in users}
    calls = [(u, router.stub.Predictions.future(request(data=b'{"text": "hi"}'),
                                                metadata=auth + (("x-user-id", u),), timeout=60))
             for _ in range(3) for u in users]
    for user, call in calls:
        call.result()
        per_user[user].add(version_of(call))
    assert all(len(v) == 1 for v in per_user.values()), per_user
    assert {v for vs in per_user.values() for v in vs} == {"1.0", "1.1"}


def test_explicit_version_wins(router, direct, auth) -> None:
    router.table.set_weights(MODEL, {"1.0": 100})
    reply, call = router.stub.Predictions.with_call(request(version="1.1"), metadata=auth + (("x-user-id", "u1"),),
                                                    timeout=30)
    assert version_of(call) == "1.1"
    assert answers_agree(reply.prediction, direct.Predictions(request(version="1.1"), metadata=auth).prediction)


def client_code(code: grpc.StatusCode, case: str) -> grpc.StatusCode:
    """TorchServe answers a model or version it does not have INTERNAL; the router NOT_FOUND."""
    return grpc.StatusCode.NOT_FOUND if case.startswith("unknown") and code == grpc.StatusCode.INTERNAL else code


@pytest.mark.parametrize("case", ["bad-input", "unknown-model", "unknown-version", "no-key", "wrong-key"])
def test_errors_pass_through_unchanged_but_whose_fault(router, direct, auth, case: str) -> None:
    req, md = {
        # TorchServe 0.12's gRPC drops a handler's status: the 400 body comes back with OK.
        "bad-input": (request(data=b'{"txt": 1}'), auth),
        "unknown-model": (request(model="no-such-model"), auth),
        "unknown-version": (request(version="9.9"), auth),
        "no-key": (request(), ()),
        "wrong-key": (request(), (("authorization", "Bearer wrong"),)),
    }[case]
    want = outcome(lambda: direct.Predictions.with_call(req, metadata=md, timeout=30))
    got = outcome(lambda: router.stub.Predictions.with_call(req, metadata=md, timeout=30))
    assert got == (client_code(want[0], case), *want[1:])
    if case != "bad-input":
        assert want[0] != grpc.StatusCode.OK
    # Streams too (these fail before any worker is involved).
    if case != "bad-input":
        with pytest.raises(grpc.RpcError) as d:
            list(direct.StreamPredictions(req, metadata=md, timeout=30))
        with pytest.raises(grpc.RpcError) as r:
            list(router.stub.StreamPredictions(req, metadata=md, timeout=30))
        assert (r.value.code(), r.value.details()) == (client_code(d.value.code(), case), d.value.details())
    # A made-up model or version is not an arm: no series of its own in /metrics.
    assert all(m != "no-such-model" and v != "9.9" for m, v in router.table.stats)


def test_a_stream_to_a_model_that_does_not_stream_is_one_answer_and_kills_no_worker(router, auth, server) -> None:
    pids = [w.pid for v in server.client.describe(MODEL) for w in v.workers]
    call = router.stub.StreamPredictions(request(), metadata=auth, timeout=30)
    replies = list(call)
    assert len(replies) == 1 and json.loads(replies[0].prediction)["intent"] == "travel"
    assert dict(call.initial_metadata()).get("x-model-version") == "1.0"
    assert [w.pid for v in server.client.describe(MODEL) for w in v.workers] == pids


def test_sequence_stream_passes_through(router, direct, auth) -> None:
    """StreamPredictions2 without a sequence id: TorchServe's in-stream error, unchanged."""
    want = list(direct.StreamPredictions2(iter([request()]), metadata=auth, timeout=30))
    got = list(router.stub.StreamPredictions2(iter([request()]), metadata=auth, timeout=30))
    assert got == want and want[0].status.message == "Parameter sequenceId is required."


def test_torchserve_down_is_unavailable_until_it_comes_back(loop, fleet, server, auth) -> None:
    port = free_ports(1)[0]
    closed = f"127.0.0.1:{port}"
    r = Router(loop, RoutingTable(routes_from_fleet(fleet)), closed)
    health = health_pb2_grpc.HealthStub(r.channel)
    back = None
    try:
        for call in (lambda: r.stub.Predictions(request(), metadata=auth, timeout=10),
                     lambda: r.stub.Ping(empty_pb2.Empty(), metadata=auth, timeout=10),
                     lambda: list(r.stub.StreamPredictions(request(), metadata=auth, timeout=10))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"TorchServe is not reachable at {closed}" in err.value.details()
        # Each call twice (first attempt and retry): the model does not stream, so the
        # router answers its stream with one Predictions call.
        assert r.table.stats[(MODEL, "1.0")].errors == 4
        # The standard health service, with no key: the router serves, TorchServe behind it does not.
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status == NOT_SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "no.such.Service" in err.value.details()

        # Watch (gRPC clients' own health checking): the status now, then each change.
        watching = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=60)
        assert next(watching).status == NOT_SERVING
        itself = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
        assert next(itself).status == SERVING
        unknown = health.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=60)
        assert next(unknown).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN

        back = loop.run(Forwarder(server.ep.grpc_inference).start(port))  # TorchServe answers at the address again
        assert next(watching).status == SERVING
        for stream in (watching, itself, unknown):
            stream.cancel()
        assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10).status == SERVING
        reply, call = r.stub.Predictions.with_call(request(), metadata=auth, timeout=30)
        assert json.loads(reply.prediction)["intent"] == "travel" and version_of(call) == "1.0"
    finally:
        if back is not None:
            loop.run(back.close())
        r.close()


def test_shadow_is_mirrored_and_compared(router, direct, auth) -> None:
    router.table.set_shadow(MODEL, "1.1", 1.0)
    texts = HELDOUT[:20]
    reqs = [request(data=json.dumps({"text": t}).encode()) for t in texts]
    routed = [router.stub.Predictions(r, metadata=auth, timeout=30).prediction for r in reqs]
    router.drain()
    expected = sum(not answers_agree(a, direct.Predictions(request(data=r.input["data"], version="1.1"),
                                                           metadata=auth, timeout=30).prediction)
                   for a, r in zip(routed, reqs))
    st = router.table.stats[(MODEL, "1.1")]
    assert (st.shadow_requests, st.shadow_errors, st.shadow_disagreements) == (20, 0, expected)
    assert st.requests == 0  # the shadow's answers never reach a client
    assert expected < 5  # the two versions mostly agree on held-out sentences


@pytest.mark.slow
def test_request_dropped_by_a_killed_worker_is_retried(router, direct, server, auth) -> None:
    """Kill 1.1's worker under load: direct clients see TorchServe's "Worker died.",
    the router's clients see no error (retried on the baseline)."""
    router.table.set_weights(MODEL, {"1.0": 50, "1.1": 50})
    # The slow restarts would roll 1.1 back and starve it of traffic: here only retries count.
    router.table.routes[MODEL].rollback = RollbackRule(max_error_rate_increase=1.0, max_p99_ratio=0)
    client = server.client
    stop, routed, direct_errors = threading.Event(), Counter(), Counter()

    def via_router() -> None:
        while not stop.is_set():
            try:
                _, call = router.stub.Predictions.with_call(request(), metadata=auth, timeout=60)
                routed[version_of(call)] += 1
            except grpc.RpcError as err:
                routed[f"error {err.code()} {err.details()}"] += 1

    def to_torchserve() -> None:
        while not stop.is_set():
            try:
                direct.Predictions(request(version="1.1"), metadata=auth, timeout=60)
            except grpc.RpcError as err:
                direct_errors[(err.code(), err.details())] += 1

    def worker_pid() -> int | None:
        return next((w.pid for v in client.describe(MODEL) if v.version == "1.1"
                     for w in v.workers if w.pid and w.status == "READY"), None)

    threads = [threading.Thread(target=via_router, daemon=True) for _ in range(6)]
    threads += [threading.Thread(target=to_torchserve, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while sum(routed.values()) < 20 and time.monotonic() < deadline:
            time.sleep(0.05)  # until the load is flowing
        for _ in range(3):  # a kill can land between batches; try again until one drops requests
            deadline = time.monotonic() + 20
            while (pid := worker_pid()) is None and time.monotonic() < deadline:
                time.sleep(0.2)  # still restarting after the previous kill
            assert pid, "intent-classifier 1.1 has no ready worker"
            os.kill(pid, 9)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not (
                    (MODEL, "1.0") in router.table.stats and router.table.stats[(MODEL, "1.0")].retries):
                time.sleep(0.05)
            if (MODEL, "1.0") in router.table.stats and router.table.stats[(MODEL, "1.0")].retries:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(70)
    deadline = time.monotonic() + 60  # leave the session's server as it was: 1.1 ready again
    while time.monotonic() < deadline and not any(v.version == "1.1" and v.ready_workers for v in client.describe(MODEL)):
        time.sleep(0.5)
    assert any(v.version == "1.1" and v.ready_workers for v in client.describe(MODEL)), "1.1 did not come back"
    assert not [k for k in routed if k.startswith("error")], routed
    assert router.table.stats[(MODEL, "1.0")].retries >= 1
    # INTERNAL, or RESOURCE_EXHAUSTED once TorchServe has seen exit code 137 (REST clients get 507).
    died = "Worker died.\norg.pytorch.serve.http.InternalServerException"
    assert set(direct_errors) <= {(grpc.StatusCode.INTERNAL, died), (grpc.StatusCode.RESOURCE_EXHAUSTED, died)}
