"""The apply plan without a server: what a changed manifest or a leftover stand-in turns into."""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

from tsfleet.control.apply import plan
from tsfleet.control.client import VersionState
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
    from tsfleet.control.apply import apply

    state = {"intent-classifier": [registered("1.1", False), registered("1.0~swap", True)]}
    assert [s.action for s in plan(fleet(), state, [])] == ["register", "set-default", "unregister"]
    done = apply(fleet(), StateOnly(state), lambda line: None, store=ROOT, report_dir=ROOT,
                 skip={("intent-classifier", "1.0")})
    assert done == []


class RefusingRouter:
    """A router's admin API that is there but fails every change (and, ``reads``
    False, every read too)."""

    def __init__(self, reads: bool = True):
        self.reads = reads

    def routes(self) -> dict:
        return self.call("GET", "/routes")

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        from tsfleet.errors import FleetError

        if method == "GET" and self.reads:
            return {}
        raise FleetError("router: 500 Internal Server Error")


def test_apply_retires_nothing_a_router_that_did_not_take_the_manifest_may_still_route_to(tmp_path: Path) -> None:
    import pytest

    from tsfleet.control.apply import apply
    from tsfleet.errors import FleetError

    state = {"intent-classifier": [registered("1.0", True), registered("1.1", False), registered("0.9", False)]}
    assert [(s.action, s.version) for s in plan(fleet(), state, [])] == [("unregister", "0.9")]
    # StateOnly cannot unregister: reaching the step would fail the test another way.
    with pytest.raises(FleetError, match=r"before step 1 of 1 \(unregister intent-classifier 0.9\): the router did "
                                         r"not take the manifest's routes \(router: 500 Internal Server Error\)"):
        apply(fleet(), StateOnly(state), lambda line: None, store=tmp_path, report_dir=tmp_path, router=RefusingRouter())
    # One that cannot even be read is found before apply changes anything.
    with pytest.raises(FleetError, match=r"^the router cannot be told of changes \(router: 500 Internal Server "
                                         r"Error\); apply changes nothing"):
        apply(fleet(), StateOnly(state), lambda line: None, store=tmp_path, report_dir=tmp_path,
              router=RefusingRouter(reads=False))


def test_no_router_listening_is_told_from_one_whose_key_cannot_be_read(tmp_path: Path) -> None:
    import socket

    import pytest

    from tsfleet.errors import NoRouter, Unreachable
    from tsfleet.control.router_admin import RouterAdmin
    from tsfleet.control.swap import RouterLink

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    lines: list[str] = []
    with pytest.raises(NoRouter):
        RouterAdmin(f"http://127.0.0.1:{port}", tmp_path / "router_key.json").routes()
    RouterLink(RouterAdmin(f"http://127.0.0.1:{port}", tmp_path / "router_key.json"), lines.append).take_fleet(
        fleet(), before_retiring=True)  # plain TorchServe: apply goes on
    assert lines and "no router" in lines[0]
    with socket.socket() as listening:  # something answers there, but apply runs where the key is not
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        admin = RouterAdmin(f"http://127.0.0.1:{listening.getsockname()[1]}", tmp_path / "router_key.json")
        with pytest.raises(Unreachable, match="give --router-key-file") as err:
            admin.routes()
        assert not isinstance(err.value, NoRouter)
