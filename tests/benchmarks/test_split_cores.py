"""--split-cores: the workers on one half of the CPUs, the serving path and the benchmark's
own load on the other, and the benchmark's affinity given back afterwards."""
from __future__ import annotations

import os
import select
import subprocess
import sys

import pytest

from benchmarks.speed.cpu import split_cores

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to split")

# A child with a few threads, so that every thread of it must be moved, not just the first.
# It says so on stdout once they run, and then waits to be killed.
THREADS = ("import threading, time; [threading.Thread(target=time.sleep, args=(60,), daemon=True).start() "
           "for _ in range(3)]; print('started', flush=True); time.sleep(60)")


def _affinities(pid: int) -> set[frozenset[int]]:
    return {frozenset(os.sched_getaffinity(int(tid))) for tid in os.listdir(f"/proc/{pid}/task")}


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_every_thread_lands_on_its_half_and_the_caller_gets_its_cpus_back() -> None:
    before = os.sched_getaffinity(0)
    worker = subprocess.Popen([sys.executable, "-c", THREADS], stdout=subprocess.PIPE, text=True)
    frontend = subprocess.Popen([sys.executable, "-c", THREADS], stdout=subprocess.PIPE, text=True)
    try:
        for proc in (worker, frontend):  # until each child has started its threads
            assert select.select([proc.stdout], [], [], 30)[0], "the child did not start its threads"
            assert proc.stdout.readline().strip() == "started"
            assert _threads(proc.pid) >= 4
        with split_cores([worker.pid], [frontend.pid]) as layout:
            assert layout["workers"] and layout["serving"]
            assert not set(layout["workers"]) & set(layout["serving"])
            assert set(layout["workers"]) | set(layout["serving"]) == before
            assert _affinities(worker.pid) == {frozenset(layout["workers"])}
            assert _affinities(frontend.pid) == {frozenset(layout["serving"])}
            assert os.sched_getaffinity(0) == set(layout["serving"])
            # What the benchmark starts now (wrk) inherits the serving half.
            child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                                   capture_output=True, text=True, check=True)
            assert child.stdout.strip() == str(sorted(layout["serving"]))
        assert os.sched_getaffinity(0) == before
    finally:
        for proc in (worker, frontend):
            proc.kill()
            proc.wait()
