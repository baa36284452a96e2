"""handlers.config's count of the CPUs a worker may use, over made-up cgroup trees: in a pod
os.cpu_count() is the node's, so the threads are sized from the cgroup's CPU quota (v2
cpu.max, v1 cpu.cfs_quota_us / cpu.cfs_period_us) and the affinity, whichever is fewest."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from handlers import config
from handlers.config import RuntimeSettings, available_cpus, cgroup_cpu_quota

NODE_CPUS = 64


@pytest.fixture(autouse=True)
def node(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large node: 64 CPUs, all of them in this process's affinity unless a test says otherwise."""
    monkeypatch.setattr(os, "cpu_count", lambda: NODE_CPUS)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(NODE_CPUS)))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def v2(tmp_path: Path, cpu_max: str | None, own: str = "/") -> tuple[Path, Path]:
    """A cgroup v2 tree whose root (the container's own, with a cgroup namespace) has ``cpu_max``."""
    root = tmp_path / "cgroup"
    root.mkdir()
    if cpu_max is not None:
        write(root / "cpu.max", cpu_max)
    return root, write(tmp_path / "self_cgroup", f"0::{own}")


def v1(tmp_path: Path, quota: str, period: str = "100000", folder: str = "cpu,cpuacct",
       own: str = "/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    write(root / folder / "cpu.cfs_quota_us", quota)
    write(root / folder / "cpu.cfs_period_us", period)
    return root, write(tmp_path / "self_cgroup", f"12:memory:{own}\n4:cpu,cpuacct:{own}\n0::/")


@pytest.mark.parametrize("cpu_max, quota, cpus", [
    ("200000 100000", 2.0, 2),
    ("150000 100000", 1.5, 1),  # rounded down: 2 threads on 1.5 CPUs would be throttled
    ("50000 100000", 0.5, 1),  # never fewer than one thread
    ("800000 50000", 16.0, 16),  # the period is not always 100 ms
])
def test_a_cgroup_v2_quota_sets_the_count(tmp_path, cpu_max, quota, cpus):
    root, own = v2(tmp_path, cpu_max)
    assert cgroup_cpu_quota(root, own) == quota
    assert available_cpus(root, own) == cpus


@pytest.mark.parametrize("cpu_max", ["max 100000", None, "", "garbage", "0 100000", "100000 0"])
def test_without_a_quota_the_count_is_the_machine_s_as_before(tmp_path, cpu_max):
    root, own = v2(tmp_path, cpu_max)
    assert cgroup_cpu_quota(root, own) is None
    assert available_cpus(root, own) == NODE_CPUS == os.cpu_count()


def test_no_cgroup_files_at_all_keeps_the_machine_s_count(tmp_path):
    assert available_cpus(tmp_path / "nothing", tmp_path / "no_self_cgroup") == NODE_CPUS


def test_a_cgroup_v1_quota_sets_the_count(tmp_path):
    root, own = v1(tmp_path, "300000")
    assert cgroup_cpu_quota(root, own) == 3.0
    assert available_cpus(root, own) == 3


@pytest.mark.parametrize("folder", ["cpu", "cpu,cpuacct"])
def test_a_cgroup_v1_quota_of_minus_one_is_none(tmp_path, folder):
    root, own = v1(tmp_path, "-1", folder=folder)
    assert cgroup_cpu_quota(root, own) is None
    assert available_cpus(root, own) == NODE_CPUS


def test_the_process_s_own_cgroup_is_followed_and_the_smallest_ancestor_quota_wins(tmp_path):
    """Without a cgroup namespace the hierarchy's root is the host's (no quota) and the
    process's cgroup is found from /proc/self/cgroup; a pod's quota binds its containers."""
    root, own = v2(tmp_path, None, own="/kubepods/pod1/ctr")
    write(root / "kubepods" / "cpu.max", "max 100000")
    write(root / "kubepods" / "pod1" / "cpu.max", "300000 100000")
    write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "400000 100000")
    assert cgroup_cpu_quota(root, own) == 3.0


def test_a_cgroup_path_that_is_not_under_the_mount_falls_back_to_its_root(tmp_path):
    """cgroup v1 in a container: /proc/self/cgroup names the host's path, the mount is the
    container's cgroup itself."""
    root, own = v1(tmp_path, "200000", own="/kubepods/burstable/pod9/abc")
    assert cgroup_cpu_quota(root, own) == 2.0


def test_a_smaller_affinity_wins_over_the_quota(tmp_path, monkeypatch):
    root, own = v2(tmp_path, "800000 100000")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3, 5})
    assert available_cpus(root, own) == 2


def test_a_smaller_quota_wins_over_the_affinity(tmp_path, monkeypatch):
    root, own = v2(tmp_path, "200000 100000")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    assert available_cpus(root, own) == 2


def test_worker_threads_split_the_quota_not_the_node(tmp_path, monkeypatch):
    """Six workers on a 64-CPU node under a 4-CPU quota get one thread each, not ten."""
    root, own = v2(tmp_path, "400000 100000")
    monkeypatch.setattr(config, "CGROUP_ROOT", root)
    monkeypatch.setattr(config, "PROC_SELF_CGROUP", own)
    assert RuntimeSettings(fleet_workers=6).threads() == 1
    assert RuntimeSettings(fleet_workers=2).threads() == 2
    assert RuntimeSettings(torch_threads=5, fleet_workers=6).threads() == 5  # set by hand: kept
    assert RuntimeSettings(fleet_workers=2).threads(cpu_count=16) == 8  # given: kept


def test_worker_threads_without_a_quota_are_as_before(tmp_path, monkeypatch):
    root, own = v2(tmp_path, "max 100000")
    monkeypatch.setattr(config, "CGROUP_ROOT", root)
    monkeypatch.setattr(config, "PROC_SELF_CGROUP", own)
    assert RuntimeSettings(fleet_workers=6).threads() == NODE_CPUS // 6


def test_this_machine_s_own_count_is_within_its_cpus():
    """On the real files: at least one CPU, never more than the kernel reports."""
    assert 1 <= available_cpus() <= NODE_CPUS
