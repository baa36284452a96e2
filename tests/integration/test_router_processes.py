"""A router of several processes (tsfleet/router/processes.py) in front of a real TorchServe:
fronts share the ports, route with the leader's routes, and their answers count in the
leader's statistics, metrics and rollbacks; a dead front is replaced, and no front outlives
its leader."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Iterator

import grpc
import psutil
import pytest
import requests

from tests.integration.conftest import ROOT, free_ports
from tests.integration.router_harness import RunningRouter
from tests.polling import wait_for
from tsfleet.router.policy.manifest_routes import fleet_routes
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc
from tsfleet.router.policy.routing import RollbackRule
from tsfleet.control.server import TorchServe

pytestmark = pytest.mark.slow
INTENT = "intent-classifier"
NEVER = RollbackRule(max_error_rate_increase=1.0, max_p99_ratio=0)
TEXTS = ["book me a flight to Rome", "my invoice is wrong", "will it rain tomorrow?", "cancel my order"]


@pytest.fixture(scope="module")
def router(fleet, server: TorchServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRouter]:
    r = RunningRouter.before(server, fleet, tmp_path_factory.mktemp("router3"), processes=3)
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture(autouse=True)
def reset_routes(router: RunningRouter) -> Iterator[None]:
    router.table.stats.clear()
    router.table.routes[INTENT].rollback = NEVER
    yield
    router.table.set_weights(INTENT, {"1.0": 100}, baseline="1.0")


def fresh(router: RunningRouter, text: str, headers: dict[str, str]) -> requests.Response:
    """One request on a new connection: the kernel picks the process that takes it."""
    return requests.post(f"{router.url}/predictions/{INTENT}", data=json.dumps({"text": text}), headers=headers,
                         timeout=60)


def holding(router: RunningRouter, port: int) -> set[int]:
    """The router processes that hold the server side of a connection to ``port`` now."""
    return {pid for pid in [os.getpid(), *router.process.fronts.pids()]
            for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port}


def counted(router: RunningRouter) -> int:
    metrics = requests.get(router.url + "/metrics", timeout=10).text  # answered by any process
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in metrics.splitlines()
               if line.startswith(f'tsfleet_router_requests_total{{model="{INTENT}"'))


def test_fronts_share_the_ports_and_the_leader_counts_every_answer(router, client, headers) -> None:
    router.admin("PUT", f"/routes/{INTENT}", json={"weights": {"1.0": 50, "1.1": 50}}).raise_for_status()
    expected = {(t, v): client.predict(INTENT, {"text": t}, version=v).json() for t in TEXTS for v in ("1.0", "1.1")}
    # Half the clients send the router's own inference key: every process swaps it for TorchServe's.
    own = {**headers, "Authorization": "Bearer " + json.loads(router.process.config.key_file.read_text())["inference"]}
    keyed = [headers, own] * 12
    sessions = [requests.Session() for _ in range(24)]
    # Each channel its own connection (grpc shares one per target otherwise), as separate clients' would be.
    channels = [grpc.insecure_channel(router.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(12)]  # all on one of 3 processes: 3 / 3**12, 6 in a million
    try:
        got = [(t, s.post(f"{router.url}/predictions/{INTENT}", data=json.dumps({"text": t}), headers=h,
                          timeout=60)) for s, h in zip(sessions, keyed) for t in TEXTS]
        holders = holding(router, int(router.url.rsplit(":", 1)[1]))
        replies = [pb_grpc.InferenceAPIsServiceStub(ch).Predictions(
            pb.PredictionsRequest(model_name=INTENT, input={"data": json.dumps({"text": t}).encode()}),
            metadata=[("authorization", h["Authorization"])], timeout=60) for ch, h in zip(channels, keyed) for t in TEXTS]
        grpc_holders = holding(router, int(router.grpc_target.rsplit(":", 1)[1]))
    finally:
        for s in sessions:
            s.close()
        for ch in channels:
            ch.close()
    assert len(holders) >= 2, f"all 24 connections went to one process: {holders}"
    assert len(grpc_holders) >= 2, f"all 12 gRPC connections went to one process: {grpc_holders}"
    assert all(r.status_code == 200 for _, r in got), [r.text for _, r in got if r.status_code != 200][:3]
    wrong = [(t, r.headers["X-Model-Version"]) for t, r in got if r.json() != expected[(t, r.headers["X-Model-Version"])]]
    assert wrong == []
    assert set(r.headers["X-Model-Version"] for _, r in got) == {"1.0", "1.1"}
    assert all(json.loads(reply.prediction)["intent"] == expected[(t, "1.0")]["intent"]
               for reply, t in zip(replies, TEXTS * len(channels)))
    total = len(got) + len(replies)
    wait_for(f"the leader counting all {total} answers", lambda: counted(router) == total, 10)
    arms = router.admin("GET", "/routes").json()[INTENT]["arms"]
    assert sum(a["requests"] for a in arms.values()) == total


def test_a_rotated_router_key_is_taken_by_every_process_before_the_rotation_returns(router, headers) -> None:
    old = json.loads(router.process.config.key_file.read_text())["inference"]
    resp = router.admin("POST", "/keys/inference", json={"grace_s": 0})
    assert resp.status_code == 200 and resp.json()["previous_valid_until"] is None
    new = resp.json()["inference"]
    with_new = [fresh(router, f"hi {i}", {**headers, "Authorization": f"Bearer {new}"}) for i in range(24)]
    with_old = [fresh(router, f"hi {i}", {**headers, "Authorization": f"Bearer {old}"}) for i in range(24)]
    assert [r.status_code for r in with_new] == [200] * 24, [r.text for r in with_new if r.status_code != 200][:2]
    assert [r.status_code for r in with_old] == [400] * 24  # TorchServe's refusal: the router no longer swaps it


def test_weight_changes_and_rollbacks_reach_every_front(router, server, headers) -> None:
    router.admin("PUT", f"/routes/{INTENT}", json={"weights": {"1.0": 0, "1.1": 100}}).raise_for_status()
    assert Counter(fresh(router, f"hi {i}", headers).headers["X-Model-Version"] for i in range(40)) == {"1.1": 40}
    # An automatic rollback is the leader's decision, from the answers of every process.
    router.table.routes[INTENT].rollback = RollbackRule(window_s=60, min_samples=15, max_error_rate_increase=0.05,
                                                        max_p99_ratio=0)
    router.admin("PUT", f"/routes/{INTENT}", json={"weights": {"1.0": 50, "1.1": 50}}).raise_for_status()
    server.client.scale(INTENT, "1.1", 0)  # the candidate can no longer answer
    try:
        got = [fresh(router, f"hi {i}", headers) for i in range(120)]
        route = wait_for("the rollback",
                         lambda: (r := router.admin("GET", "/routes").json()[INTENT])["rolled_back"] and r, 10)
        assert route["weights"]["1.1"] == 0 and "error rate" in route["rolled_back"]["reason"]
        assert all(r.status_code == 200 for r in got if r.headers.get("X-Model-Version") == "1.0")
        after = [fresh(router, f"after {i}", headers) for i in range(40)]
        assert [(r.status_code, r.headers["X-Model-Version"]) for r in after] == [(200, "1.0")] * 40
    finally:
        server.client.scale(INTENT, "1.1", 1)


def test_every_process_answers_readiness_by_model_from_the_leader_s_routes(router, server) -> None:
    def probes(query: str) -> list[int]:  # each on a new connection: the kernel spreads them over the processes
        return [requests.get(f"{router.url}/readyz{query}", timeout=10).status_code for _ in range(24)]

    assert probes("?models=all") == [200] * 24
    server.client.scale(INTENT, "1.1", 0)
    try:
        router.admin("PUT", f"/routes/{INTENT}", json={"weights": {"1.0": 0, "1.1": 100}}).raise_for_status()
        wait_for("every process to see 1.1 without workers", lambda: probes(f"?models={INTENT}") == [503] * 24, 10)
        assert probes("?models=image-classifier") == [200] * 24
    finally:
        server.client.scale(INTENT, "1.1", 1)


def test_models_leaving_and_joining_the_manifest_reach_every_front(router, fleet) -> None:
    def probes() -> list[int]:  # an unknown model is a 404: each process answers from its own routes
        return [requests.get(f"{router.url}/readyz?models=image-classifier", timeout=10).status_code for _ in range(24)]

    without = {m: s for m, s in fleet_routes(fleet).items() if m != "image-classifier"}
    try:
        changes = router.admin("PUT", "/fleet", json=without).json()["changes"]
        assert changes == ["image-classifier: route removed (the model left the manifest)"]
        assert probes() == [404] * 24  # the change returns once every front has it
    finally:
        changes = router.admin("PUT", "/fleet", json=fleet_routes(fleet)).json()["changes"]
    assert changes == ["image-classifier: new route, all traffic to 1.0"]
    assert probes() == [200] * 24


def test_a_dead_front_is_started_again(fleet, server, headers, tmp_path: Path) -> None:
    r = RunningRouter(fleet, tmp_path, server.ep.url("inference"), f"127.0.0.1:{server.ep.grpc_inference}",
                      processes=3)
    try:
        victim = r.process.fronts.pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for("a new front",
                 lambda: victim not in r.process.fronts.pids() and r.process.fronts.fronts[0].ready.is_set(), 20)
        assert all(psutil.pid_exists(p) for p in r.process.fronts.pids())
        assert [fresh(r, f"hi {i}", headers).status_code for i in range(40)] == [200] * 40
        pids = r.process.fronts.pids()
    finally:
        r.stop()
    wait_for("the fronts exiting with the router", lambda: not any(psutil.pid_exists(p) for p in pids), 10)


def test_no_front_outlives_a_killed_leader(server, tmp_path: Path) -> None:
    rest, admin, grpc_port = free_ports(3)
    leader = subprocess.Popen(
        [sys.executable, "-m", "tsfleet", "--config", str(server.config), "route", "--processes", "3",
         "--port", str(rest), "--admin-port", str(admin), "--grpc-port", str(grpc_port),
         "--state-file", str(tmp_path / "state.json")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        line = wait_for("the router's banner", lambda: leader.stdout.readline(), 60)
        assert f"REST http://127.0.0.1:{rest}" in line and "(3 processes)" in line, line
        fronts = [p.pid for p in psutil.Process(leader.pid).children()]
        assert len(fronts) == 2
    finally:
        leader.kill()
        leader.wait()
    wait_for("the fronts exiting after their leader",
             lambda: not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                             for p in fronts), 10)
