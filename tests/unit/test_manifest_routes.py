"""A running router's routes brought to a changed manifest (tsfleet/router/policy/manifest_routes.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tsfleet.router.policy.manifest_routes import check_fleet_routes, take_fleet
from tsfleet.router.policy.routing import Route, RoutingTable


def spec(default: str, *versions: str, **more: object) -> dict:
    return {"default_version": default, "versions": list(versions) or [default], "rollback": {}, "streaming": False,
            **more}


def routes(**weights: dict[str, float]) -> RoutingTable:
    return RoutingTable({m.replace("_", "-"): Route(m.replace("_", "-"), next(iter(w)), dict(w))
                         for m, w in weights.items()})


def test_an_unchanged_manifest_changes_nothing_and_a_split_under_way_stays() -> None:
    table = routes(intent={"1.0": 90, "1.1": 10})
    assert take_fleet(table, {"intent": spec("1.0", "1.0", "1.1")}) == []
    assert table.routes["intent"].weights == {"1.0": 90, "1.1": 10} and table.routes["intent"].baseline == "1.0"


def test_a_default_moved_in_the_manifest_takes_all_the_traffic(tmp_path: Path) -> None:
    table = RoutingTable({"intent": Route("intent", "1.0", {"1.0": 90, "1.1": 10})}, tmp_path / "state.json")
    changes = take_fleet(table, {"intent": spec("1.1", "1.0", "1.1")})
    assert changes == ["intent: all traffic to 1.1, the manifest's default (was 1.0 90, 1.1 10)"]
    assert (table.routes["intent"].baseline, table.routes["intent"].weights) == ("1.1", {"1.1": 100.0})
    assert json.loads((tmp_path / "state.json").read_text())["routes"]["intent"]["weights"] == {"1.1": 100.0}
    assert {table.choose("intent").version for _ in range(20)} == {"1.1"}


def test_versions_that_left_lose_their_weight_and_their_shadow() -> None:
    table = routes(intent={"1.0": 80, "1.1": 10, "1.2": 10})
    table.set_shadow("intent", "1.2", 0.5)
    changes = take_fleet(table, {"intent": spec("1.0", "1.0", "1.1")})
    assert changes == ["intent: weights of versions that left the manifest dropped (1.2)",
                       "intent: shadow 1.2 stopped (it left the manifest)"]
    assert table.routes["intent"].weights == {"1.0": 80, "1.1": 10} and table.routes["intent"].shadow is None
    # The baseline itself left: the default takes everything.
    table = routes(intent={"0.9": 100})
    assert take_fleet(table, {"intent": spec("1.0")}) == ["intent: all traffic to 1.0, the manifest's default (was 0.9 100)"]


def test_models_come_and_go_with_the_manifest_s_rule() -> None:
    table = routes(intent={"1.0": 100}, old={"1.0": 100})
    changes = take_fleet(table, {"intent": spec("1.0"), "image": spec("2.0", rollback={"min_samples": 7},
                                                                        streaming=True)})
    assert changes == ["old: route removed (the model left the manifest)", "image: new route, all traffic to 2.0"]
    assert set(table.routes) == {"intent", "image"}
    image = table.routes["image"]
    assert (image.baseline, image.weights, image.rollback.min_samples, image.streaming) == ("2.0", {"2.0": 100}, 7, True)
    assert table.choose("old").version is None  # no route: TorchServe's answer, as for any unknown model


def test_a_default_that_did_not_start_does_not_take_the_traffic() -> None:
    # up leaves out a version that did not start: the manifest's default without it.
    table = routes(intent={"1.0": 100})
    assert take_fleet(table, {"intent": spec("1.1", "1.0")}) == []
    assert table.routes["intent"].weights == {"1.0": 100}
    assert take_fleet(table, {"new": spec("1.0", "0.9")}) == ["intent: route removed (the model left the manifest)"]
    assert "new" not in table.routes


@pytest.mark.parametrize("doc, words", [
    ([], "expected {model:"),
    ({"m": {"versions": ["1"]}}, "m: default_version (a string) and versions (a list) are needed"),
    ({"m": {"default_version": "1", "versions": ["1"], "rollback": {"window": 3}}}, "m: rollback:"),
])
def test_a_malformed_fleet_is_refused_before_anything_changes(doc: object, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_fleet_routes(doc)


def test_a_router_starting_on_an_older_state_file_yields_to_the_manifest(tmp_path: Path) -> None:
    # Weights saved before the router stopped; meanwhile fleet.yaml retired 1.1 (a canary) and
    # moved image-classifier's default: the started router must not send traffic to either.
    from tsfleet.manifest import load_fleet
    from tsfleet.router.app import RouterConfig, RouterProcess

    fleet = load_fleet(Path(__file__).resolve().parents[2] / "fleet.yaml")
    state = tmp_path / "router_state.json"
    state.write_text(json.dumps({"routes": {
        "intent-classifier": {"baseline": "1.0", "weights": {"1.0": 90, "0.9": 10}},
        "image-classifier": {"baseline": "0.5", "weights": {"0.5": 100}}}}))
    router = RouterProcess(fleet, RouterConfig(state_file=state, key_file=tmp_path / "router_key.json"))
    routes = router.table.routes
    assert (routes["intent-classifier"].baseline, routes["intent-classifier"].weights) == ("1.0", {"1.0": 90})
    assert (routes["image-classifier"].baseline, routes["image-classifier"].weights) == ("1.0", {"1.0": 100})
    assert json.loads(state.read_text())["routes"]["image-classifier"]["weights"] == {"1.0": 100}
