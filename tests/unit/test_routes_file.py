"""The routes file a router follows (tsfleet/router/routes_file.py), in a directory laid out and
swapped as the kubelet does a mounted ConfigMap: a swap moves the routes, a bad content is
refused with the last good routes kept, and the state file's record of the content decides
who wins on a restart. A real router and TorchServe: tests/integration/test_routes_file.py."""
from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest

from tests.configmap_mount import MountedConfigMap
from tests.polling import until
from tests.prometheus_text import value
from tsfleet.router.policy import routes_doc
from tsfleet.router.policy.routing import RollbackRule, Route, RoutingTable
from tsfleet.router.routes_file import RoutesFile

VERSIONS = {"m": ("1.0", "1.1"), "n": ("2.0",)}


def routes(weights: dict[str, float], baseline: str = "1.0", **extra: object) -> str:
    return json.dumps({"routes": {"m": {"baseline": baseline, "weights": weights, **extra}}})


def new_table(state: Path | None) -> RoutingTable:
    """The routes a router starts from: the manifest's (all on the default), then its state file."""
    return RoutingTable({"m": Route("m", "1.0", {"1.0": 100.0}, versions=VERSIONS["m"]),
                         "n": Route("n", "2.0", {"2.0": 100.0}, versions=VERSIONS["n"])}, state)


def follower(table: RoutingTable, mount: MountedConfigMap) -> RoutesFile:
    return RoutesFile(mount.path, table, lambda: VERSIONS, poll_s=0.01)


@pytest.fixture
def mount(tmp_path: Path) -> MountedConfigMap:
    return MountedConfigMap(tmp_path / "routes")


def test_a_kubelet_swap_moves_the_routes_and_reaches_the_fronts(mount, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    mount.publish(routes({"1.0": 100}))
    table = new_table(tmp_path / "router_state.json")
    told = []
    table.on_change = lambda: told.append(table.state())  # how the leader tells its fronts (processes.py)
    watcher = follower(table, mount)
    watcher.start_up()
    assert watcher.poll() is False  # nothing moved

    mount.publish(routes({"1.0": 70, "1.1": 30}, shadow="1.1", shadow_share=0.5))
    assert watcher.poll() is True
    route = table.routes["m"]
    assert route.weights == {"1.0": 70.0, "1.1": 30.0} and (route.shadow, route.shadow_share) == ("1.1", 0.5)
    assert told[-1]["routes"]["m"]["weights"] == {"1.0": 70.0, "1.1": 30.0}
    assert table.routes["n"].weights == {"2.0": 100.0}  # a model the file leaves out keeps its route
    saved = json.loads((tmp_path / "router_state.json").read_text())
    assert saved["routes"]["m"]["weights"] == {"1.0": 70.0, "1.1": 30.0}
    assert saved["routes_file"]["sha256"] == routes_doc.digest(mount.path.read_bytes())
    assert f"routes file {mount.path} applied" in caplog.text and "m 1.0 70, 1.1 30 (baseline 1.0)" in caplog.text
    assert value(watcher.prometheus(), "tsfleet_router_routes_file_applied_total") == 2

    # The same content published again (a resync) changes nothing and says nothing.
    mount.publish(routes({"1.0": 70, "1.1": 30}, shadow="1.1", shadow_share=0.5))
    caplog.clear()
    assert watcher.poll() is False and "applied" not in caplog.text


@pytest.mark.parametrize("content, problem", [
    ("{not json", "not JSON"),
    ("", "not JSON"),
    ('["routes"]', 'expected {"routes"'),
    (json.dumps({"route": {}}), 'expected {"routes"'),
    (json.dumps({"routes": {"ghost": {"baseline": "1.0", "weights": {"1.0": 100}}}}), "unknown model 'ghost'"),
    (routes({"1.0": 50, "9.9": 50}), "weight for version '9.9' is not a version of the manifest"),
    (routes({"1.0": 100}, baseline="9.9"), "baseline '9.9' is not a version of the manifest"),
    (routes({"1.0": "50", "1.1": 50}), "weight of 1.0 is '50', not a number"),
    (routes({"1.0": True}), "weight of 1.0 is True, not a number"),
    (routes({"1.0": 0, "1.1": 0}), "every weight is 0"),
    (routes({"1.0": 150}), "weight of 1.0 is 150"),
    (routes({"1.0": 100}, shadow="9.9", shadow_share=0.1), "shadow '9.9'"),
    (routes({"1.0": 100}, weight=5), "unknown key(s) weight"),
    (json.dumps({"routes": {"m": {"weights": {"1.0": 100}}}}), "baseline and weights are needed"),
])
def test_a_bad_content_is_refused_once_and_the_last_good_routes_hold(mount, tmp_path: Path, caplog,
                                                                     content: str, problem: str) -> None:
    mount.publish(routes({"1.0": 60, "1.1": 40}))
    table = new_table(tmp_path / "router_state.json")
    watcher = follower(table, mount)
    watcher.start_up()
    good = table.state()
    mount.publish(content)
    caplog.clear()
    assert watcher.poll() is False
    assert table.state() == good and table.routes["m"].weights == {"1.0": 60.0, "1.1": 40.0}
    refusals = [r for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and refusals[0].levelno == logging.ERROR
    assert str(mount.path) in refusals[0].getMessage() and problem in refusals[0].getMessage()
    assert value(watcher.prometheus(), "tsfleet_router_routes_file_refused_total") == 1
    assert watcher.poll() is False and watcher.refused == 1  # looked at again: not refused (nor logged) again
    mount.publish(routes({"1.0": 10, "1.1": 90}))  # fixed: taken
    assert watcher.poll() is True and table.routes["m"].weights == {"1.0": 10.0, "1.1": 90.0}


def test_an_auto_rollback_survives_a_restart_until_the_file_changes(mount, tmp_path: Path) -> None:
    state = tmp_path / "router_state.json"
    mount.publish(routes({"1.0": 50, "1.1": 50}))
    first = new_table(state)
    follower(first, mount).start_up()
    assert first.routes["m"].weights == {"1.0": 50.0, "1.1": 50.0}
    first.roll_back("m", "1.1", "error rate 40% vs baseline 0% over 60 s")  # the ConfigMap could not be patched

    # Restarted on the same file: the state's rollback, made after the file, holds.
    second = new_table(state)
    follower(second, mount).start_up()
    assert second.routes["m"].weights == {"1.0": 50.0, "1.1": 0.0}
    assert second.routes["m"].rolled_back["version"] == "1.1"

    # A kubectl apply while the router was down: the file wins.
    mount.publish(routes({"1.0": 80, "1.1": 20}))
    third = new_table(state)
    follower(third, mount).start_up()
    assert third.routes["m"].weights == {"1.0": 80.0, "1.1": 20.0} and third.routes["m"].rolled_back is None

    # A pod with no state yet (a new pod): the file.
    fresh = new_table(tmp_path / "elsewhere.json")
    follower(fresh, mount).start_up()
    assert fresh.routes["m"].weights == {"1.0": 80.0, "1.1": 20.0}


def test_a_file_refused_at_start_leaves_the_saved_routes(mount, tmp_path: Path) -> None:
    state = tmp_path / "router_state.json"
    new_table(state).set_weights("m", {"1.0": 90, "1.1": 10})
    mount.publish(routes({"1.0": 50, "7.0": 50}))
    table = new_table(state)
    watcher = follower(table, mount)
    watcher.start_up()
    assert table.routes["m"].weights == {"1.0": 90.0, "1.1": 10.0} and watcher.refused == 1


def test_an_absent_file_is_said_once_and_taken_when_it_appears(mount, tmp_path: Path, caplog) -> None:
    table = new_table(tmp_path / "router_state.json")
    watcher = follower(table, mount)  # an empty ConfigMap: no key mounted yet
    watcher.start_up()
    assert watcher.poll() is False and watcher.poll() is False
    assert sum("is absent" in r.getMessage() for r in caplog.records) == 1
    mount.publish(routes({"1.0": 75, "1.1": 25}))
    assert watcher.poll() is True and table.routes["m"].weights == {"1.0": 75.0, "1.1": 25.0}


def test_aliases_stay_each_router_s_own(mount, tmp_path: Path) -> None:
    table = new_table(None)
    table.set_aliases("m", {"1.0": "1.0~swap"})  # this router's TorchServe is swapping 1.0's settings
    mount.publish(routes({"1.0": 100}, aliases={"1.0": "elsewhere"}))
    follower(table, mount).start_up()
    assert table.routes["m"].aliases == {"1.0": "1.0~swap"}


def test_the_watcher_follows_swaps_by_itself(mount, tmp_path: Path) -> None:
    mount.publish(routes({"1.0": 100}))
    table = new_table(None)
    watcher = follower(table, mount)
    watcher.start_up()
    settled = []

    async def scenario() -> None:
        async def fronts_settled() -> None:
            settled.append(dict(table.routes["m"].weights))

        watcher.settled = fronts_settled
        watcher.start()
        mount.publish(routes({"1.0": 20, "1.1": 80}))
        await until("the swap taken", lambda: settled, timeout=5)
        watcher.stop()

    asyncio.run(scenario())
    assert settled == [{"1.0": 20.0, "1.1": 80.0}]


def test_every_arm_s_rollback_counter_starts_at_zero() -> None:
    table = new_table(None)
    table.routes["m"].rollback = RollbackRule(window_s=60, min_samples=5, max_p99_ratio=0)
    text = table.prometheus()
    for model, version in (("m", "1.0"), ("m", "1.1"), ("n", "2.0")):
        assert value(text, "tsfleet_router_rollbacks_total", model=model, version=version) == 0
    table.set_weights("m", {"1.0": 50, "1.1": 50})
    seen = []
    table.on_rollback = lambda *event: seen.append(event)
    for i in range(5):
        table.record("m", "1.0", True, 0.01, now=i)
        table.record("m", "1.1", False, 0.01, now=i)
    assert value(table.prometheus(), "tsfleet_router_rollbacks_total", model="m", version="1.1") == 1
    assert [(m, v) for m, v, _ in seen] == [("m", "1.1")]  # automatic rollbacks only are announced
    table.roll_back("m", "1.1", "rolled back by hand")
    assert len(seen) == 1


def test_a_rollback_edits_only_its_model_in_the_document() -> None:
    doc = {"routes": {"m": {"baseline": "1.0", "weights": {"1.0": 90, "1.1": 10}}, "n": {"baseline": "2.0",
                                                                                          "weights": {"2.0": 100}}}}
    event = {"version": "1.1", "reason": "p99", "at": 1.0}
    new = routes_doc.with_rollback(doc, "m", "1.1", event, {"baseline": "1.0", "weights": {"1.0": 100}})
    assert new["routes"]["m"] == {"baseline": "1.0", "weights": {"1.0": 90, "1.1": 0.0}, "rolled_back": event}
    assert new["routes"]["n"] == doc["routes"]["n"] and doc["routes"]["m"]["weights"]["1.1"] == 10  # a copy
    alone = routes_doc.with_rollback({"routes": {}}, "m", "1.1", event,
                                     {"baseline": "1.0", "weights": {"1.0": 0, "1.1": 100}})
    assert alone["routes"]["m"]["weights"] == {"1.0": 100.0, "1.1": 0.0}  # nobody left: all to the baseline
    routes_doc.check_routes(new, VERSIONS)
