"""The router's own CPU time and memory, in its /metrics.

A front door must show what a client costs it: these are the figures an alert (or a test)
reads to see one connection take a core or pin memory. With several router processes the
leader reports every process it runs, so a scrape that reaches any of them sees all.
"""
from __future__ import annotations

import psutil

CPU = "tsfleet_router_process_cpu_seconds_total"
RSS = "tsfleet_router_process_resident_memory_bytes"


def process_metrics(processes: dict[str, int]) -> str:
    """Prometheus text for ``processes`` (role -> pid): CPU seconds (user + system) and
    resident memory; a process that is gone is left out."""
    cpu, rss = [], []
    for role, pid in processes.items():
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                times, memory = proc.cpu_times(), proc.memory_info()
        except psutil.Error:
            continue
        cpu.append(f'{CPU}{{process="{role}"}} {times.user + times.system:.3f}')
        rss.append(f'{RSS}{{process="{role}"}} {memory.rss}')
    return "\n".join([f"# HELP {CPU} CPU time (user and system) of each router process.", f"# TYPE {CPU} counter", *cpu,
                      f"# HELP {RSS} Resident memory of each router process.", f"# TYPE {RSS} gauge", *rss]) + "\n"
