"""Routes from a file every replica follows (``tsfleet route --routes-file``; on Kubernetes a
mounted ConfigMap), end to end on a real router and TorchServe: a kubelet-style swap of the
mounted file moves traffic on every router process, a bad file is refused with the routes
kept, and an automatic rollback the ConfigMap could not record survives a router restart
while a later change of the file still takes effect. No cluster here: the router finds no
service account, so it counts the rollback as unrecorded (tests/unit/test_kube.py writes one
into an API server's ConfigMap)."""
from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import requests

from tests.configmap_mount import MountedConfigMap
from tests.integration.router_harness import RunningRouter
from tests.polling import wait_for
from tsfleet.manifest import Fleet
from tsfleet.router.policy.routing import RollbackRule
from tsfleet.control.server import TorchServe

pytestmark = [pytest.mark.integration, pytest.mark.slow]
INTENT = "intent-classifier"
NEVER = RollbackRule(max_error_rate_increase=1.0, max_p99_ratio=0)


def routes(weights: dict[str, float], baseline: str = "1.0") -> str:
    return json.dumps({"routes": {INTENT: {"baseline": baseline, "weights": weights}}}, indent=2)


def start(fleet: Fleet, server: TorchServe, workdir: Path, mount: MountedConfigMap, processes: int) -> RunningRouter:
    router = RunningRouter.before(server, fleet, workdir, keyed=False, processes=processes, routes_file=mount.path,
                                  routes_configmap="tsfleet-routes",
                                  service_account_dir=workdir / "no-service-account")
    router.table.routes[INTENT].rollback = NEVER  # a latency blip of a busy box moves nothing here
    return router


def versions(router: RunningRouter, headers: dict[str, str], n: int, fresh: bool = True) -> Counter:
    """Who answered ``n`` requests; ``fresh``: each on a new connection, which the kernel
    hands to any of the router's processes (SO_REUSEPORT)."""
    path = f"/predictions/{INTENT}"
    bodies = [json.dumps({"text": f"book a flight {i}"}).encode() for i in range(n)]
    got = [requests.post(router.url + path, data=body, headers=headers, timeout=60) if fresh
           else router.post(path, body, headers) for body in bodies]
    assert [r.status_code for r in got] == [200] * n, [r.text for r in got if r.status_code != 200]
    return Counter(r.headers["X-Model-Version"] for r in got)


def taken(router: RunningRouter, weights: dict[str, float]) -> None:
    """Wait until the leader routes by ``weights`` (its admin API says so)."""
    wait_for(f"the router to take {weights}",
             lambda: router.admin("GET", "/routes").json()[INTENT]["weights"] == weights, timeout=15)


def metric(router: RunningRouter, name: str) -> float:
    text = requests.get(router.url + "/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else -1.0


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> MountedConfigMap:
    folder = MountedConfigMap(tmp_path_factory.mktemp("configmap") / "routes")
    folder.publish(routes({"1.0": 100}))
    return folder


@pytest.fixture(scope="module")
def router(fleet, server: TorchServe, mount: MountedConfigMap,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningRouter]:
    r = start(fleet, server, tmp_path_factory.mktemp("router"), mount, processes=2)
    try:
        yield r
    finally:
        r.stop()


def test_a_kubelet_swap_moves_the_traffic_of_every_process(router, mount, headers, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tsfleet.router.routes_file")
    assert versions(router, headers, 10) == Counter({"1.0": 10})
    mount.publish(routes({"1.0": 0, "1.1": 100}))
    taken(router, {"1.0": 0.0, "1.1": 100.0})
    # Each request on a connection of its own: both processes route by the new weights
    # (30 landing on one process by chance: 2^-29). The leader's fronts take it a moment later.
    wait_for("every process on 1.1", lambda: versions(router, headers, 30) == Counter({"1.1": 30}), timeout=15)
    assert metric(router, "tsfleet_router_routes_file_applied_total") >= 1
    assert f"routes file {mount.path} applied" in caplog.text

    mount.publish(routes({"1.0": 50, "1.1": 50}))
    taken(router, {"1.0": 50.0, "1.1": 50.0})
    assert versions(router, headers, 20, fresh=False) == Counter({"1.0": 10, "1.1": 10})  # one process's exact split


def test_a_bad_file_is_refused_and_the_routes_hold(router, mount, headers, caplog) -> None:
    mount.publish(routes({"1.0": 0, "1.1": 100}, baseline="1.1"))
    taken(router, {"1.0": 0.0, "1.1": 100.0})
    wait_for("every process on 1.1", lambda: versions(router, headers, 30) == Counter({"1.1": 30}), timeout=15)
    refused = metric(router, "tsfleet_router_routes_file_refused_total")
    assert refused >= 0
    mount.publish('{"routes": {"intent-classifier": {"baseline": "1.0", "weights": {"1.0": 50, "1.1": ')  # cut short
    wait_for("the refusal", lambda: metric(router, "tsfleet_router_routes_file_refused_total") == refused + 1,
             timeout=15)
    mount.publish(routes({"1.0": 50, "9.9": 50}))  # a version the manifest does not have
    wait_for("the second refusal", lambda: metric(router, "tsfleet_router_routes_file_refused_total") == refused + 2,
             timeout=15)
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert any(str(mount.path) in line and "not JSON" in line for line in lines), lines
    assert any("'9.9' is not a version of the manifest" in line for line in lines), lines
    assert versions(router, headers, 20) == Counter({"1.1": 20})  # the last good routes, on every process
    assert router.admin("GET", "/routes").json()[INTENT]["weights"] == {"1.0": 0.0, "1.1": 100.0}


def test_an_automatic_rollback_survives_a_restart_until_the_file_changes(fleet, server, headers,
                                                                          tmp_path: Path) -> None:
    mount = MountedConfigMap(tmp_path / "routes")
    mount.publish(routes({"1.0": 50, "1.1": 50}))
    router = start(fleet, server, tmp_path, mount, processes=1)
    try:
        router.table.routes[INTENT].rollback = RollbackRule(window_s=60, min_samples=15, max_error_rate_increase=0.05,
                                                            max_p99_ratio=0)
        server.client.scale(INTENT, "1.1", 0)  # the candidate can no longer answer
        try:
            wait_for("the automatic rollback",
                     lambda: versions(router, headers, 10, fresh=False) and router.table.routes[INTENT].weights["1.1"] == 0,
                     timeout=120)
        finally:
            server.client.scale(INTENT, "1.1", 1)  # ready again (scale waits): it would answer if sent traffic
        # No service account here: the rollback holds on this replica, counted as unrecorded.
        wait_for("the unrecorded count", lambda: metric(router, "tsfleet_router_rollback_unrecorded_total") == 1)
        assert metric(router, f'tsfleet_router_rollbacks_total{{model="{INTENT}",version="1.1"}}') == 1
    finally:
        router.stop()

    router = start(fleet, server, tmp_path, mount, processes=1)  # the same file, unchanged: the rollback holds
    try:
        route = router.admin("GET", "/routes").json()[INTENT]
        assert route["weights"] == {"1.0": 50.0, "1.1": 0.0} and route["rolled_back"]["version"] == "1.1"
        assert versions(router, headers, 20) == Counter({"1.0": 20})
        assert metric(router, f'tsfleet_router_rollbacks_total{{model="{INTENT}",version="1.0"}}') == 0
        # A kubectl apply after it: the file wins again.
        mount.publish(routes({"1.0": 0, "1.1": 100}))
        taken(router, {"1.0": 0.0, "1.1": 100.0})
        assert versions(router, headers, 10, fresh=False) == Counter({"1.1": 10})
        assert router.admin("GET", "/routes").json()[INTENT]["rolled_back"] is None
    finally:
        router.stop()
