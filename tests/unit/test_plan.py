"""The apply plan without a server: what a changed manifest or a leftover stand-in turns into."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from tsfleet.apply import plan
from tsfleet.client import VersionState
from tsfleet.manifest import Fleet, parse_fleet

ROOT = Path(__file__).resolve().parents[2]


def fleet(batch_size: int = 8) -> Fleet:
    doc = copy.deepcopy(yaml.safe_load((ROOT / "fleet.yaml").read_text()))
    doc["models"] = {"intent-classifier": doc["models"]["intent-classifier"]}
    doc["models"]["intent-classifier"]["serving"] = {"batch_size": batch_size}
    doc["workflows"] = {}
    return parse_fleet(doc, ROOT)


def registered(version: str, default: bool, batch_size: int = 8) -> VersionState:
    return VersionState("intent-classifier", version, f"intent-classifier-{version}.mar", default,
                        batch_size, 5, 120, 1, 1, ())


def test_a_batch_change_of_the_default_is_a_replace_not_a_refusal() -> None:
    state = {"intent-classifier": [registered("1.0", True), registered("1.1", False)]}
    steps = plan(fleet(batch_size=4), state, [])
    assert [(s.action, s.version) for s in steps] == [("replace", "1.0"), ("replace", "1.1")]
    assert "batch_size 8 -> 4" in steps[0].detail and "stand-in" in steps[0].detail


def test_a_leftover_stand_in_is_retired_after_its_version_is_back() -> None:
    state = {"intent-classifier": [registered("1.1", False), registered("1.0~swap", True)]}
    steps = [(s.action, s.version) for s in plan(fleet(), state, [])]
    assert steps == [("register", "1.0"), ("set-default", "1.0"), ("unregister", "1.0~swap")]


def test_a_stand_in_beside_a_version_still_to_swap_is_left_to_the_swap() -> None:
    state = {"intent-classifier": [registered("1.0", True), registered("1.1", False, 4),
                                   registered("1.0~swap", False, 4)]}
    steps = [(s.action, s.version) for s in plan(fleet(batch_size=4), state, [])]
    assert steps == [("replace", "1.0")]


class StateOnly:
    """A management client that only describes (any change would fail the test)."""

    def __init__(self, state: dict):
        self._state = state

    def state(self) -> dict:
        return self._state

    def list_workflows(self) -> list[str]:
        return []


def test_a_version_up_skips_leaves_its_stand_in_serving() -> None:
    # up, after 1.0 would not start again: the stand-in that serves 1.0's traffic stays, and
    # 1.0 is neither registered nor made the default.
    from tsfleet.apply import apply

    state = {"intent-classifier": [registered("1.1", False), registered("1.0~swap", True)]}
    assert [s.action for s in plan(fleet(), state, [])] == ["register", "set-default", "unregister"]
    done = apply(fleet(), StateOnly(state), lambda line: None, store=ROOT, report_dir=ROOT,
                 skip={("intent-classifier", "1.0")})
    assert done == []
