"""Routing decisions without a server: split, stickiness, shadow share, rollback, state."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from tests.prometheus_text import value
from tsfleet.router.policy.compare import answers_agree
from tsfleet.router.policy.routing import RollbackRule, Route, RoutingTable


def table(path: Path | None = None, **weights: float) -> RoutingTable:
    w = {k[1:].replace("_", "."): v for k, v in weights.items()} or {"1.0": 100.0}
    return RoutingTable({"m": Route("m", "1.0", w, rollback=RollbackRule(window_s=60, min_samples=20))}, path)


def test_90_10_over_10000_requests_is_within_a_point_and_a_half() -> None:
    t = table(v1_0=90, v1_1=10)
    share = Counter(t.choose("m").version for _ in range(10_000))["1.1"] / 10_000
    assert abs(share - 0.10) <= 0.015


def test_sticky_keys_never_change_arm_while_weights_are_constant() -> None:
    t = table(v1_0=90, v1_1=10)
    first = {u: t.choose("m", sticky_key=f"user-{u}").version for u in range(5000)}
    for _ in range(3):
        assert {u: t.choose("m", sticky_key=f"user-{u}").version for u in range(5000)} == first
    assert abs(Counter(first.values())["1.1"] / 5000 - 0.10) < 0.02


def test_10_to_20_percent_moves_only_the_users_who_must_move() -> None:
    t = table(v1_0=90, v1_1=10)
    before = {u: t.choose("m", sticky_key=f"user-{u}").version for u in range(10_000)}
    t.set_weights("m", {"1.0": 80, "1.1": 20})
    after = {u: t.choose("m", sticky_key=f"user-{u}").version for u in range(10_000)}
    moved = [u for u in before if before[u] != after[u]]
    assert all(before[u] == "1.0" and after[u] == "1.1" for u in moved)
    assert abs(len(moved) / 10_000 - 0.10) < 0.015  # the 10% that had to move, no more


def test_explicit_version_wins_over_weights_and_stickiness() -> None:
    t = table(v1_0=100)
    choice = t.choose("m", explicit="1.1", sticky_key="user-1")
    assert choice.version == "1.1" and choice.explicit
    assert t.choose("unknown-model").version is None


def test_a_split_follows_weights_changed_in_place_and_by_a_state_from_the_leader() -> None:
    t = table(v1_0=90, v1_1=10)
    assert {t.choose("m").version for _ in range(100)} == {"1.0", "1.1"}
    t.routes["m"].weights["1.1"] = 0.0  # as a rollback does: the dict itself changes
    assert {t.choose("m").version for _ in range(100)} == {"1.0"}
    t.apply_state({"routes": {"m": {"baseline": "1.1", "weights": {"1.0": 0, "1.1": 100}}}})
    assert {t.choose("m", sticky_key=f"user-{u}").version for u in range(100)} == {"1.1"}
    t.apply_state({"routes": {"m": {"baseline": "1.0", "weights": {"1.0": 50, "1.1": 50}}}})
    assert Counter(t.choose("m").version for _ in range(100)) == {"1.0": 50, "1.1": 50}


def test_shadow_share_is_exact() -> None:
    t = table(v1_0=100)
    t.set_shadow("m", "1.1", 0.25)
    assert sum(t.choose("m").shadow == "1.1" for _ in range(1000)) == 250


def test_candidate_with_more_errors_is_rolled_back_after_enough_samples() -> None:
    t = table(v1_0=50, v1_1=50)
    for i in range(19):
        assert t.record("m", "1.0", True, 0.01, now=i) is None
        assert t.record("m", "1.1", False, 0.01, now=i) is None  # not enough samples yet
    t.record("m", "1.0", True, 0.01, now=19)
    event = t.record("m", "1.1", False, 0.01, now=19)
    assert event and event["version"] == "1.1" and "error rate 100.0%" in event["reason"]
    assert t.routes["m"].weights == {"1.0": 50, "1.1": 0.0}
    assert all(t.choose("m").version == "1.0" for _ in range(50))
    assert value(t.prometheus(), "tsfleet_router_rollbacks_total", model="m", version="1.1") == 1


def test_a_rollback_the_disk_cannot_record_still_happens(tmp_path: Path, caplog) -> None:
    # A full disk (here: the state file's folder is a file) must not fail the request whose
    # answer triggered the rollback, nor stop the rollback.
    (tmp_path / "full").write_text("")
    t = table(tmp_path / "full" / "state.json", v1_0=50, v1_1=50)
    for i in range(20):
        t.record("m", "1.0", True, 0.01, now=i)
        event = t.record("m", "1.1", False, 0.01, now=i)
    assert event and t.routes["m"].weights == {"1.0": 50, "1.1": 0.0}
    assert "cannot save the routes" in caplog.text
    with pytest.raises(OSError):  # a person's change says it was not saved
        t.set_weights("m", {"1.0": 100})


def test_slow_candidate_is_rolled_back_and_old_samples_leave_the_window() -> None:
    t = table(v1_0=50, v1_1=50)
    for i in range(25):  # long ago: outside the 60 s window when judged
        t.record("m", "1.1", True, 5.0, now=i)
    for i in range(25):
        t.record("m", "1.0", True, 0.010, now=1000 + i)
        assert t.record("m", "1.1", True, 0.012, now=1000 + i) is None  # fine once the old ones age out
    for i in range(25):
        t.record("m", "1.0", True, 0.010, now=1030 + i)
        event = t.record("m", "1.1", True, 0.200, now=1030 + i)
        if event:
            break
    assert event and event["reason"].startswith("p99")


def test_a_latency_blip_of_a_few_ms_is_not_a_regression() -> None:
    t = table(v1_0=50, v1_1=50)
    for i in range(60):  # 3x the baseline's p99, but only 20 ms more: under the 50 ms margin
        t.record("m", "1.0", True, 0.010, now=i)
        assert t.record("m", "1.1", True, 0.030, now=i) is None
    assert t.routes["m"].weights["1.1"] == 50


def test_weights_survive_a_restart_through_the_state_file(tmp_path: Path) -> None:
    state = tmp_path / "router_state.json"
    t = table(state)
    t.set_weights("m", {"1.0": 70, "1.1": 30})
    t.set_shadow("m", "1.2", 0.1)
    assert [p.name for p in tmp_path.iterdir()] == ["router_state.json"]  # no temporary file left
    again = table(state)
    assert again.routes["m"].weights == {"1.0": 70.0, "1.1": 30.0}
    assert again.routes["m"].shadow == "1.2" and json.loads(state.read_text())["routes"]["m"]["shadow_share"] == 0.1


def test_an_alias_sends_a_version_elsewhere_and_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "router_state.json"
    t = table(state)
    t.set_aliases("m", {"1.0": "1.0~swap"})
    assert t.upstream("m", "1.0") == "1.0~swap" and t.upstream("m", "1.1") == "1.1"
    assert t.upstream("other", "1.0") == "1.0" and t.upstream("m", None) is None
    assert t.choose("m").version == "1.0"  # clients and statistics still see the manifest's version
    assert table(state).upstream("m", "1.0") == "1.0~swap"
    t.set_aliases("m", {})
    assert table(state).upstream("m", "1.0") == "1.0"


def test_answers_agree_on_the_decision_or_on_close_numbers() -> None:
    assert answers_agree(b'{"intent": "travel", "confidence": 0.9}', b'{"intent": "travel", "confidence": 0.7}')
    assert not answers_agree(b'{"label": "circle"}', b'{"label": "square"}')
    assert answers_agree(b'{"embedding": [0.1, 0.2]}', b'{"embedding": [0.1004, 0.2]}')
    assert not answers_agree(b'{"embedding": [0.1, 0.2]}', b'{"embedding": [0.12, 0.2]}')
    assert answers_agree(b"\x89PNG", b"\x89PNG") and not answers_agree(b"a", b"b")


def test_a_front_collects_answers_for_its_leader_and_never_rolls_back_itself() -> None:
    leader, front = table(v1_0=50, v1_1=50), table(v1_0=50, v1_1=50)
    front.sink, front.shadow_sink, front.decides = [], [], False
    for i in range(30):
        assert front.record("m", "1.0", True, 0.01, now=i) is None
        assert front.record("m", "1.1", False, 0.01, now=i) is None  # worse than the rule allows
    front.record_shadow("m", "1.1", True, False)
    assert front.routes["m"].weights["1.1"] == 50 and front.routes["m"].rolled_back is None
    assert len(front.sink) == 60 and front.shadow_sink == [("m", "1.1", True, False)]
    events = [leader.record(*answer, now=i / 2) for i, answer in enumerate(front.sink)]  # as the leader takes them
    assert any(events) and leader.routes["m"].weights["1.1"] == 0


def test_a_front_takes_the_leader_s_routes_and_tells_of_changes() -> None:
    leader, front = table(v1_0=100), table(v1_0=100)
    changes = []
    leader.on_change = lambda: changes.append(leader.state())
    leader.set_weights("m", {"1.0": 80, "1.1": 20})
    leader.set_shadow("m", "1.1", 0.5)
    assert len(changes) == 2
    front.apply_state(changes[-1])
    assert front.routes["m"].weights == {"1.0": 80, "1.1": 20}
    assert (front.routes["m"].shadow, front.routes["m"].shadow_share) == ("1.1", 0.5)


def test_rollout_status_shows_no_latency_for_an_arm_with_nothing_in_the_window() -> None:
    from tsfleet.control.rollout import render_status

    t = table(v1_0=90, v1_1=10)
    for i in range(10):
        t.record("m", "1.0", True, 0.020, now=1000 + i)
    t.record("m", "1.1", True, 0.030, now=0)  # long before the window
    rows = {line.split()[1]: line.split() for line in render_status(t.snapshot(now=1010)).splitlines()[1:]}
    assert rows["1.0"][4:6] == ["10", "0.0%"] and 20 <= float(rows["1.0"][6]) <= 20.8  # within a 4% bin
    assert rows["1.1"][4:8] == ["1", "0.0%", "-", "-"]  # counted, but not a 0 ms arm
