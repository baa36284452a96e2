"""The router's own CPU time and memory, in its /metrics.

A front door must show what a client costs it: these are the figures an alert (or a test)
reads to see one connection take a core or pin memory. With several router processes the
leader reports every process it runs, so a scrape that reaches any of them sees all.
"""
from __future__ import annotations

from typing import Callable, Iterator

import psutil
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CPU = "tsfleet_router_process_cpu_seconds_total"
RSS = "tsfleet_router_process_resident_memory_bytes"


class ProcessMetrics(Collector):
    """CPU seconds (user + system) and resident memory of ``processes()`` (role -> pid), read
    at scrape time; a process that is gone is left out."""

    def __init__(self, processes: Callable[[], dict[str, int]]):
        self.processes = processes

    def collect(self) -> Iterator[Metric]:
        """The two families, one sample per live process."""
        cpu = CounterMetricFamily(CPU, "CPU time (user and system) of each router process.", labels=("process",))
        rss = GaugeMetricFamily(RSS, "Resident memory of each router process.", labels=("process",))
        for role, pid in self.processes().items():
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    times, memory = proc.cpu_times(), proc.memory_info()
            except psutil.Error:
                continue
            cpu.add_metric((role,), round(times.user + times.system, 3))
            rss.add_metric((role,), memory.rss)
        yield cpu
        yield rss


def process_metrics(processes: dict[str, int]) -> str:
    """Prometheus text for ``processes`` (role -> pid): ProcessMetrics, as read now."""
    return generate_latest(ProcessMetrics(lambda: processes)).decode()
