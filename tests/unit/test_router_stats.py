"""The router's per-arm window: percentiles from per-second histograms, whole-second edges."""
from __future__ import annotations

import random

from tsfleet.router.policy.stats import BIN_GROWTH, ArmStats


def test_percentiles_are_the_sorted_samples_to_within_a_bin() -> None:
    rng, st = random.Random(3), ArmStats()
    samples = [rng.lognormvariate(-4.0, 0.8) for _ in range(20_000)]
    for i, latency in enumerate(samples):
        st.add(True, latency, now=i / 1000)  # 20 s of answers
    exact = sorted(samples)
    for q in (0.5, 0.9, 0.99):
        want = exact[int(q * len(exact))]
        assert want <= st.percentile(q, 60, now=20.0) <= want * BIN_GROWTH
    assert st.recent(60, now=20.0)[0] == 20_000


def test_errors_and_samples_leave_the_window_by_the_second() -> None:
    st = ArmStats()
    for i in range(10):
        st.add(False, 1.0, now=100 + i)  # slow failures at 100..109 s
    for i in range(10):
        st.add(True, 0.01, now=150 + i)  # fast answers at 150..159 s
    assert st.recent(60, now=159.5) == (20, 0.5, st.recent(60, now=159.5)[2])
    assert st.recent(60, now=159.5)[2] > 1.0  # the p99 is still a slow one
    n, error_rate, p99 = st.recent(60, now=170.5)  # 100..109 are older than 60 s now
    assert (n, error_rate) == (10, 0.0) and p99 < 0.011
    assert st.requests == 20 and st.errors == 10  # the counters keep everything


def test_a_short_window_does_not_cut_a_longer_one() -> None:
    st = ArmStats()
    for i in range(100):
        st.add(True, 0.01, now=i)
    assert st.recent(10, now=99.0)[0] == 11  # the answers at 89..99 s
    assert st.recent(60, now=99.0)[0] == 61  # ...and the 10 s window dropped none of 39..88
