"""The soak's figures (benchmarks/soak): the memory slope and which series it judges, the
per-window latencies, and the checks that make it a gate. No fleet: made-up samples."""
from __future__ import annotations

import pytest

from benchmarks.soak.load import targets
from benchmarks.soak.memory import JVM_WARMUP_S, MIN_SPAN_S, SETTLE_S, Series, fit, slope_per_min
from benchmarks.soak.report import checks, loopback, requests_part


def flat_then_step(step_at: float, step_mib: float) -> list[tuple[float, float]]:
    return [(float(t), 300.0 + (step_mib if t >= step_at else 0.0)) for t in range(0, 600, 5)]


def test_a_step_early_in_the_window_is_no_slope_and_steady_growth_is() -> None:
    # An arena taken as the load peaks early on: under 29% of the pairs cross it.
    assert slope_per_min(flat_then_step(60, 40)) == pytest.approx(0.0, abs=0.01)
    # Memory that went up in mid-run and stayed up is not flat: it counts.
    assert slope_per_min(flat_then_step(300, 40)) > 2.0
    leak = [(float(t), 300 + 3 * t / 60) for t in range(0, 600, 5)]
    assert slope_per_min(leak) == pytest.approx(3.0)
    # Steady growth under noise is still found.
    noisy = [(t, m + (5 if i % 3 == 0 else -5)) for i, (t, m) in enumerate(leak)]
    assert slope_per_min(noisy) == pytest.approx(3.0, abs=0.3)


def series(samples: list[tuple[float, float]], kind: str = "worker", role: str = "serving") -> Series:
    return Series(1234, kind, "text-embedder 1.0 (slot 1234)", role, samples)


def test_a_series_is_fitted_after_the_warm_up_and_judged_against_the_threshold() -> None:
    leak = series([(float(t), 300 + 3 * t / 60) for t in range(0, 600, 5)])
    row = fit(leak, warmup_end=120, max_slope=2.0)
    assert row["judged"] and not row["ok"] and row["slope_mib_per_min"] == pytest.approx(3.0)
    assert row["start_mib"] == pytest.approx(306.0) and row["drift_mib"] == pytest.approx(3 * 475 / 60, abs=0.1)
    assert fit(leak, warmup_end=120, max_slope=5.0)["ok"]


def test_a_series_too_short_or_started_late_is_listed_but_not_judged() -> None:
    short = series([(float(t), 300 + t) for t in range(0, 50, 5)])
    row = fit(short, warmup_end=0, max_slope=2.0)
    assert not row["judged"] and row["ok"] and f"under {MIN_SPAN_S:.0f} s" in row["why_not_judged"]
    # A successor that started after the warm-up: its own first SETTLE_S (its load) is left out.
    late = series([(float(t), 100.0 if t < 230 else 340.0) for t in range(200, 400, 5)])
    row = fit(late, warmup_end=120, max_slope=2.0)
    assert row["judged"] and row["ok"] and row["start_mib"] == 340.0 and row["slope_mib_per_min"] == 0.0
    assert SETTLE_S == 30.0


def test_the_jvm_is_judged_outside_its_committed_heap() -> None:
    jvm = series([(float(t), 400 + t / 10) for t in range(0, 600, 5)], kind="frontend", role="")
    jvm.heap = {float(t): 160 + t / 10 for t in range(0, 600, 5)}  # all the growth is heap G1 committed
    row = fit(jvm, warmup_end=120, max_slope=2.0)
    assert row["slope_mib_per_min"] == pytest.approx(6.0) and row["heap_slope_mib_per_min"] == pytest.approx(6.0)
    assert row["judged_on"] == "RSS outside the committed Java heap" and row["judged_slope_mib_per_min"] == 0.0
    assert row["judged"] and row["ok"]


def test_the_jvm_is_fitted_after_its_own_warm_up() -> None:
    # Measured (docs/reliability.md): the JVM's RSS outside its heap climbs for ~2 minutes of
    # load (JIT, Netty's pools, malloc arenas), then stays flat.
    warm = [(float(t), 300 + min(t, 120) / 3) for t in range(0, 600, 5)]
    jvm = series(warm, kind="frontend", role="")
    row = fit(jvm, warmup_end=24, max_slope=2.0)
    assert row["judged"] and row["ok"] and row["start_mib"] == pytest.approx(340.0)
    # A 2-minute run ends before the JVM's warm-up does: listed, not judged, and it says why
    # (from the run's own 24 s warm-up it would read as +20 MiB/min).
    assert not fit(series(warm[:25]), warmup_end=24, max_slope=2.0)["ok"]
    short = fit(series(warm[:25], kind="frontend", role=""), warmup_end=24, max_slope=2.0)
    assert not short["judged"] and short["ok"] and f"{JVM_WARMUP_S:.0f} s of load" in short["why_not_judged"]
    # Growth that goes on after the warm-up is still judged, and fails.
    leak = series([(float(t), 300 + 3 * t / 60) for t in range(0, 600, 5)], kind="frontend", role="")
    assert not fit(leak, warmup_end=24, max_slope=2.0)["ok"]


def test_windows_figures_and_failures_by_kind() -> None:
    paths = targets()
    records = [(t / 10, 0.1 if t % 10 else 0.5, t % len(paths), "" if t != 33 else "REST 503", "1.0")
               for t in range(1, 101)]
    records.append((10.4, 0.2, 0, "", "1.0"))  # answered after the end: the last window's
    doc = requests_part(records, paths, 10.0)
    assert doc["totals"]["requests"] == 101 and doc["totals"]["failed"] == 1
    assert doc["totals"]["failures_by_kind"] == {"REST 503": 1}
    assert [w["t"] for w in doc["windows"]] == [5.0, 10.0]
    assert sum(w["requests"] for w in doc["windows"]) == 101
    assert len(doc["paths"]) == 7 and {m for m in doc["models"]} == {
        "text-embedder", "intent-classifier", "image-classifier", "intent-pipeline"}
    assert doc["totals"]["p99_ms"] == 500.0 and doc["totals"]["p50_ms"] == 100.0


@pytest.mark.parametrize("ip, expected", [("127.0.0.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
                                          ("0.0.0.0", False), ("::", False), ("10.1.2.3", False)])
def test_loopback_addresses_as_the_jvm_and_python_write_them(ip: str, expected: bool) -> None:
    assert loopback(ip) is expected


def passing_doc() -> dict:
    return {"totals": {"requests": 100, "failed": 0, "failures_by_kind": {}},
            "processes": [{"name": "router", "judged": True, "ok": True, "judged_on": "RSS",
                           "judged_slope_mib_per_min": 0.1}],
            "recycles": [{"t": 10.0, "ok": True, "detail": ""}],
            "events": [{"what": "kill -9", "pid": 9, "detail": "m 1.0", "back_after_s": 4.0, "t": 20.0},
                       {"what": "weight change", "rc": 0, "command": "tsfleet rollout start m 1.1", "t": 30.0},
                       {"what": "weight change", "rc": 0, "command": "tsfleet rollout rollback m", "t": 40.0}],
            "meta": {"listeners": ["127.0.0.1:8080", "::ffff:127.0.0.1:8081"]}, "not_ready_at_end": []}


def test_the_gate_passes_a_clean_run_and_names_what_failed() -> None:
    assert all(c["ok"] for c in checks(passing_doc(), 2.0))
    for change, failing in (
            (lambda d: d["totals"].update(failed=1, failures_by_kind={"gRPC UNAVAILABLE": 1}), "no request failed"),
            (lambda d: d["processes"][0].update(ok=False, judged_slope_mib_per_min=3.0), "memory flat"),
            (lambda d: d.update(recycles=[]), "recycling"),
            (lambda d: d["events"][0].pop("back_after_s"), "a worker killed"),
            (lambda d: d["events"].pop(), "a weight change"),
            (lambda d: d["meta"]["listeners"].append("0.0.0.0:8090"), "loopback only"),
            (lambda d: d.update(not_ready_at_end=["m 1.0 (0/1)"]), "every version")):
        doc = passing_doc()
        change(doc)
        failed = [c["check"] for c in checks(doc, 2.0) if not c["ok"]]
        assert len(failed) == 1 and failed[0].startswith(failing), failed
