"""Recycle policy decisions, without a server."""
from __future__ import annotations

from tsfleet.manifest import RecyclePolicy
from tsfleet.recycle import Report, Trend, over_limit, request_limit


def report(**kw) -> Report:
    base = dict(pid=4242, requests=0, started=1000.0, rss_mb=300.0, cuda_mb=0.0)
    return Report(**{**base, **kw})


def test_jitter_spreads_limits_but_is_stable_per_worker() -> None:
    policy = RecyclePolicy(max_requests=1000, max_requests_jitter=100)
    limits = {pid: request_limit(policy, pid) for pid in range(1000, 1200)}
    assert all(1000 <= v <= 1100 for v in limits.values())
    assert len(set(limits.values())) > 50  # workers started together do not restart together
    assert all(request_limit(policy, pid) == v for pid, v in limits.items())
    assert request_limit(RecyclePolicy(), 1) == 0


def test_each_limit_names_itself() -> None:
    now = 5000.0
    assert over_limit(RecyclePolicy(max_requests=10), report(requests=10), now).startswith("max_requests")
    assert over_limit(RecyclePolicy(max_age_s=3600), report(started=now - 3601), now).startswith("max_age")
    assert over_limit(RecyclePolicy(max_rss_mb=512), report(rss_mb=600), now).startswith("max_rss")
    assert over_limit(RecyclePolicy(max_gpu_memory_mb=100), report(cuda_mb=150), now).startswith("max_gpu_memory")
    assert over_limit(RecyclePolicy(max_requests=10, max_rss_mb=512), report(requests=3), now) is None
    assert not RecyclePolicy().enabled


def test_a_worker_that_would_cross_a_limit_before_its_replacement_is_ready_goes_now() -> None:
    policy = RecyclePolicy(max_rss_mb=1000, max_requests=5000)
    # 900 MB, growing 50 MB/s, replacements take 4 s here: it would be at 1100 MB by then.
    assert over_limit(policy, report(rss_mb=900), 0, Trend(4.0, rss_mb_per_s=50)).startswith("max_rss")
    assert over_limit(policy, report(rss_mb=900), 0, Trend(1.0, rss_mb_per_s=50)) is None
    assert over_limit(policy, report(requests=4700), 0, Trend(4.0, requests_per_s=100)).startswith("max_requests")
