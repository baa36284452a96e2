"""The router's and the recycler's /metrics, written by prometheus_client from collectors that
read the counters at scrape time: the names, types and labels dashboards and alerts query,
and label values that come back whole whatever they hold."""
from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.prometheus_text import samples, types, value
from tsfleet.control.recycle import Event, Recycler
from tsfleet.manifest import Fleet, load_fleet
from tsfleet.router.app import RouterConfig, RouterProcess
from tsfleet.router.policy.routing import Route, RoutingTable
from tsfleet.router.policy.stats import BUCKETS

ROOT = Path(__file__).resolve().parents[2]
# A quote, a backslash and a newline: the three a label value must escape. Hand-written text
# cut the label at the quote and the line at the newline.
ODD_MODEL, ODD_VERSION = 'say "hi"\\now', "1.0\nbeta\\"

# Every family the router's /metrics has, and its type: what the Grafana dashboard, the
# PrometheusRule and the prometheus-adapter query (k8s/monitoring; tests/k8s/test_monitoring.py).
ROUTER_FAMILIES = {
    "tsfleet_router_requests_total": "counter", "tsfleet_router_errors_total": "counter",
    "tsfleet_router_retries_total": "counter", "tsfleet_router_shadow_requests_total": "counter",
    "tsfleet_router_shadow_disagreements_total": "counter", "tsfleet_router_latency_seconds": "histogram",
    "tsfleet_router_rollbacks_total": "counter", "tsfleet_router_limit_hits_total": "counter",
    "tsfleet_router_process_cpu_seconds_total": "counter", "tsfleet_router_process_resident_memory_bytes": "gauge",
}


def test_label_values_with_quotes_backslashes_and_newlines_come_back_whole() -> None:
    table = RoutingTable({ODD_MODEL: Route(ODD_MODEL, ODD_VERSION, {ODD_VERSION: 100.0}, versions=(ODD_VERSION,))})
    table.record(ODD_MODEL, ODD_VERSION, True, 0.02)
    table.record(ODD_MODEL, ODD_VERSION, False, 3.0)
    text = table.prometheus()
    arm = {"model": ODD_MODEL, "version": ODD_VERSION}
    assert value(text, "tsfleet_router_requests_total", **arm) == 2
    assert value(text, "tsfleet_router_errors_total", **arm) == 1
    assert value(text, "tsfleet_router_rollbacks_total", **arm) == 0
    assert value(text, "tsfleet_router_latency_seconds_bucket", le="0.025", **arm) == 1
    assert value(text, "tsfleet_router_latency_seconds_bucket", le="+Inf", **arm) == 2
    assert value(text, "tsfleet_router_latency_seconds_count", **arm) == 2
    assert value(text, "tsfleet_router_latency_seconds_sum", **arm) == 3.02
    assert '\\"hi\\"\\\\now' in text and "1.0\\nbeta\\\\" in text  # as the exposition format escapes them


def test_the_recycler_s_label_values_come_back_whole(tmp_path: Path) -> None:
    recycler = Recycler(Fleet(tmp_path, {}), client=None, report_dir=tmp_path, progress=lambda line: None)
    recycler._record(Event(ODD_MODEL, ODD_VERSION, 7, 'max_rss: "900" MB', False))
    recycler.workers = {(ODD_MODEL, ODD_VERSION): (1, 2)}
    text = recycler.metrics()
    assert value(text, "tsfleet_worker_recycles_total", model=ODD_MODEL, version=ODD_VERSION, reason="max_rss",
                 outcome="failed") == 1
    assert value(text, "tsfleet_workers_ready", model=ODD_MODEL, version=ODD_VERSION) == 1
    assert value(text, "tsfleet_workers_wanted", model=ODD_MODEL, version=ODD_VERSION) == 2
    assert types(text) == {"tsfleet_worker_recycles_total": "counter", "tsfleet_workers_ready": "gauge",
                           "tsfleet_workers_wanted": "gauge"}


def test_each_arm_s_histogram_keeps_its_buckets_and_adds_up() -> None:
    table = RoutingTable({"m": Route("m", "1.0", {"1.0": 100.0})})
    for latency in (0.001, 0.004, 0.3, 0.3, 20.0):
        table.record("m", "1.0", True, latency)
    buckets = {dict(labels)["le"]: n
               for labels, n in samples(table.prometheus(), "tsfleet_router_latency_seconds_bucket").items()}
    assert list(buckets) == [repr(b) for b in BUCKETS] + ["+Inf"]  # the bounds as /metrics always wrote them
    assert buckets["0.005"] == 2 and buckets["0.25"] == 2 and buckets["0.5"] == 4 and buckets["+Inf"] == 5


def test_the_whole_router_s_metrics_keep_their_families_and_types(tmp_path: Path) -> None:
    async def main() -> tuple[str, str, str]:  # built in a loop, as `tsfleet route` builds it
        config = RouterConfig(state_file=tmp_path / "state.json", key_file=tmp_path / "key.json")
        router = RouterProcess(load_fleet(ROOT / "fleet.yaml"), config)
        model = next(iter(router.table.routes))
        version = router.table.routes[model].baseline
        router.table.record(model, version, True, 0.01)
        router.hits["grpc"].message_bytes += 2
        return router.metrics_text(), model, version

    text, model, version = asyncio.run(main())
    assert types(text) == ROUTER_FAMILIES
    assert value(text, "tsfleet_router_requests_total", model=model, version=version) == 1
    assert value(text, "tsfleet_router_limit_hits_total", limit="message_bytes", front="grpc") == 2
    assert value(text, "tsfleet_router_process_cpu_seconds_total", process="leader") > 0
    assert value(text, "tsfleet_router_process_resident_memory_bytes", process="leader") > 1 << 20
    helps = {f.name: f.documentation for f in text_string_to_metric_families(text)}
    assert helps["tsfleet_router_requests"] == "Requests answered per arm."  # the help text as it always was
