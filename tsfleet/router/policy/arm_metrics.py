"""Each arm's statistics (stats.py) as Prometheus metric families, made when /metrics is read.

A request adds to plain integers on its arm's ArmStats and nothing else: this collector reads
them at scrape time only, and prometheus_client writes the text, escaping label values (a
model or version with a quote, a backslash or a newline in its name stays one label).
With several router processes the leader's table holds every process's answers
(router/processes.py), so one collector over it counts them all.
"""
from __future__ import annotations

from typing import Collection, Iterator, Mapping, Protocol

from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from tsfleet.router.policy.stats import BUCKETS, ArmStats

LABELS = ("model", "version")
# (metric, ArmStats attribute, help), in the order /metrics has always listed them.
COUNTERS = (
    ("tsfleet_router_requests_total", "requests", "Requests answered per arm."),
    ("tsfleet_router_errors_total", "errors", "5xx or unreachable answers per arm."),
    ("tsfleet_router_retries_total", "retries", "Requests retried once after a dropped worker."),
    ("tsfleet_router_shadow_requests_total", "shadow_requests", "Requests mirrored to a shadow."),
    ("tsfleet_router_shadow_disagreements_total", "shadow_disagreements", "Shadow answers that differed."),
)
# Each bucket's "le", as Prometheus writes a float ("0.005", "1.0", "+Inf").
LE = tuple(floatToGoString(bound) for bound in (*BUCKETS, float("inf")))


class RouteView(Protocol):
    """What the rollback counters read of a route (policy/routing.Route)."""

    @property
    def baseline(self) -> str: ...

    @property
    def weights(self) -> Mapping[str, float]: ...

    @property
    def versions(self) -> Collection[str]: ...


class TableView(Protocol):
    """What the collector reads of the routing table (policy/routing.RoutingTable; not
    imported: routing.py imports this module)."""

    @property
    def routes(self) -> Mapping[str, RouteView]: ...

    @property
    def stats(self) -> Mapping[tuple[str, str], ArmStats]: ...

    @property
    def rollbacks_total(self) -> Mapping[tuple[str, str], int]: ...


class ArmMetrics(Collector):
    """The routing table's per-arm counters, latency histogram and rollback counters."""

    def __init__(self, table: TableView):
        self.table = table

    def collect(self) -> Iterator[Metric]:
        """The families, as read now (the event loop's thread also records: one pass, no awaits)."""
        arms = sorted(self.table.stats.items())
        for name, attr, help_text in COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=LABELS)
            for arm, st in arms:
                family.add_metric(arm, getattr(st, attr))
            yield family
        latency = HistogramMetricFamily("tsfleet_router_latency_seconds", "Latency per arm.", labels=LABELS)
        for arm, st in arms:
            cumulative, acc = [], 0
            for le, n in zip(LE, st.buckets):
                acc += n
                cumulative.append((le, acc))
            latency.add_metric(arm, cumulative, st.latency_sum)
        yield latency
        rollbacks = CounterMetricFamily("tsfleet_router_rollbacks_total", "Automatic rollbacks of a candidate.",
                                        labels=LABELS)
        # Every arm from 0, so that increase() sees the first rollback too.
        every = {(m, v): 0 for m, r in self.table.routes.items() for v in {*r.versions, *r.weights, r.baseline}}
        for arm, n in sorted({**every, **self.table.rollbacks_total}.items()):
            rollbacks.add_metric(arm, n)
        yield rollbacks
