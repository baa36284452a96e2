"""Per-arm statistics of the router: counters, a Prometheus latency histogram, and a
sliding window (error rate, percentiles) that rollbacks and retry deadlines read."""
from __future__ import annotations

import bisect
import math
from collections import deque

REFRESH_S = 0.25
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
MIN_LATENCY_S, BIN_GROWTH = 1e-4, 1.04  # the window's latency bins
_LOG_GROWTH = math.log(BIN_GROWTH)


class ArmStats:
    """Counts, a latency histogram and a sliding window for one (model, version).

    The window keeps one slot per second, each with a count, an error count and a fine
    latency histogram (bins 4% wide), not every answer: at thousands of requests a second a
    60 s window of raw samples held hundreds of thousands of them, and sorting them for the
    p99 cost the router ~30 us of CPU per request. Window edges are whole seconds and
    percentiles the upper edge of their bin (at most 4% high).
    """

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.retries = 0
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0
        self.slots: deque[list] = deque()  # [second, answers, errors, {bin: answers}]
        self.keep_s = 60.0  # the longest window asked for
        self.shadow_requests = 0
        self.shadow_errors = 0
        self.shadow_disagreements = 0
        self._recent: tuple[float, float, tuple[int, float, float], dict[int, int]] | None = None

    def add(self, ok: bool, latency: float, now: float) -> None:
        self.requests += 1
        self.errors += not ok
        self.latency_sum += latency
        self.buckets[bisect.bisect_left(BUCKETS, latency)] += 1
        slots = self.slots
        second = math.floor(now)
        if not slots or second > slots[-1][0]:
            slots.append([second, 0, 0, {}])
            self._prune(now)
        slot = slots[-1]
        slot[1] += 1
        slot[2] += not ok
        b = 0 if latency <= MIN_LATENCY_S else int(math.log(latency / MIN_LATENCY_S) / _LOG_GROWTH) + 1  # _bin
        hist = slot[3]
        hist[b] = hist.get(b, 0) + 1

    def _prune(self, now: float) -> None:
        while self.slots and self.slots[0][0] + 1 <= now - self.keep_s:
            self.slots.popleft()

    def recent(self, window_s: float, now: float) -> tuple[int, float, float]:
        """(samples, error rate, p99 latency) over the last ``window_s``.

        It feeds retry deadlines and rollback checks on every request, which need it fresh
        to the second, not to the request: the answer is reused for REFRESH_S.
        """
        cached = self._recent
        if cached and cached[0] == window_s and now - cached[1] < REFRESH_S:
            return cached[2]
        self.keep_s = max(self.keep_s, window_s)
        self._prune(now)
        n = errors = 0
        merged: dict[int, int] = {}
        for second, answers, errs, hist in self.slots:
            if second + 1 <= now - window_s:
                continue
            n, errors = n + answers, errors + errs
            for b, c in hist.items():
                merged[b] = merged.get(b, 0) + c
        result = (n, errors / n, _quantile(merged, n, 0.99)) if n else (0, 0.0, 0.0)
        self._recent = (window_s, now, result, merged)
        return result

    def percentile(self, q: float, window_s: float, now: float) -> float:
        n = self.recent(window_s, now)[0]
        return _quantile(self._recent[3], n, q) if n else 0.0


def _bin(latency: float) -> int:
    """Histogram bin of a latency: 0 up to MIN_LATENCY_S, then bins BIN_GROWTH wide."""
    return 0 if latency <= MIN_LATENCY_S else int(math.log(latency / MIN_LATENCY_S) / _LOG_GROWTH) + 1


def _quantile(hist: dict[int, int], n: int, q: float) -> float:
    """The ``q`` quantile (as the n-th sorted sample would give it): its bin's upper edge."""
    rank, seen = min(n - 1, int(q * n)), 0
    for b in sorted(hist):
        seen += hist[b]
        if seen > rank:
            return MIN_LATENCY_S * BIN_GROWTH ** b
    return 0.0
