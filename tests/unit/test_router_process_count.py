"""How many router processes ``--processes auto`` starts, and what the command line accepts."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from tsfleet.cli import _processes_arg
from tsfleet.router.processes import AUTO_MAX, auto_processes, usable_cpus


@pytest.mark.parametrize(("cpus", "expected"), [(1, 1), (2, 1), (7, 1), (8, 2), (12, 3), (16, 4), (96, AUTO_MAX)])
def test_auto_is_one_process_per_four_cpus_at_most_four(cpus: int, expected: int) -> None:
    assert auto_processes(cpus) == expected


def test_a_container_cpu_quota_caps_the_affinity(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs: two of them run at once
    assert usable_cpus(cpu_max) == min(affinity, 2)
    cpu_max.write_text("max 100000\n")
    assert usable_cpus(cpu_max) == affinity
    assert usable_cpus(tmp_path / "absent") == affinity
    cpu_max.write_text("garbled\n")
    assert usable_cpus(cpu_max) == affinity


@pytest.mark.parametrize("text", ["auto", "1", "4"])
def test_processes_arg_takes_auto_or_a_count(text: str) -> None:
    assert _processes_arg(text) == text


@pytest.mark.parametrize("text", ["0", "-2", "two", ""])
def test_processes_arg_refuses_anything_else(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="auto or a count of at least 1"):
        _processes_arg(text)
