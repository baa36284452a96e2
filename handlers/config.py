"""Typed handler settings, read from the ``handler:`` section of the .mar's model-config.yaml.

Every model shares the runtime settings below; a handler subclass adds its own keys with
defaults in its ``OPTIONS`` class attribute. Unknown keys fail the model's load with a
message that names them, so a typo in the manifest cannot silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, Mapping

AMP_DTYPES = ("off", "fp16", "bf16")
AMP_CPU = ("off", "bf16", "auto")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Where the kernel shows a process its CPU quota. In a container with a cgroup namespace of its
# own (Kubernetes on cgroup v2) this is the container's cgroup; elsewhere the process's cgroup
# is found from /proc/self/cgroup under it.
CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
# cgroup v1 mounts the cpu controller under either name, alone or joined with cpuacct.
_V1_CPU_DIRS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # absent (no such controller, another cgroup version) or unreadable
        return None


def _own_cgroup(self_cgroup: Path, controller: str) -> str:
    """This process's cgroup path for ``controller`` ("" for v2's unified line), relative to
    the hierarchy's root, from /proc/self/cgroup ("0::/a/b", "4:cpu,cpuacct:/a/b")."""
    for line in (_read(self_cgroup) or "").splitlines():
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if (controllers == "" and controller == "") or (controller and controller in controllers.split(",")):
            return path.strip("/")
    return ""


def _with_ancestors(base: Path, relative: str) -> list[Path]:
    """``base`` and every folder from it down to ``base/relative``: a parent's quota binds
    its children too (a pod's cgroup holds its containers')."""
    found, here = [base], base
    for part in (p for p in relative.split("/") if p and p not in (".", "..")):
        here = here / part
        found.append(here)
    return found


def _quota_v2(text: str | None) -> float | None:
    """cpu.max: "QUOTA PERIOD" in microseconds, or "max PERIOD" for none."""
    parts = (text or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(quota_text: str | None, period_text: str | None) -> float | None:
    """cpu.cfs_quota_us (-1 for none) over cpu.cfs_period_us."""
    try:
        quota, period = int(quota_text or ""), int(period_text or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_cpu_quota(root: Path | None = None, self_cgroup: Path | None = None) -> float | None:
    """The CPU quota this process runs under, in CPUs (1.5 for "150000 100000"), the
    smallest of its cgroup's and its ancestors', cgroup v2 or v1; None where there is none."""
    root = CGROUP_ROOT if root is None else root
    self_cgroup = PROC_SELF_CGROUP if self_cgroup is None else self_cgroup
    quotas = [_quota_v2(_read(d / "cpu.max")) for d in _with_ancestors(root, _own_cgroup(self_cgroup, ""))]
    for name in _V1_CPU_DIRS:
        base = root / name
        if base.is_dir():
            quotas += [_quota_v1(_read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us"))
                       for d in _with_ancestors(base, _own_cgroup(self_cgroup, "cpu"))]
            break
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def available_cpus(root: Path | None = None, self_cgroup: Path | None = None) -> int:
    """The CPUs this process may use: the fewest of the machine's (os.cpu_count: in a pod,
    the node's), its affinity (a cpuset, taskset) and its cgroup CPU quota (a container's
    CPU limit). A fractional quota rounds down, at least 1: threads that together want more
    than the quota are throttled for the rest of each period, which stalls whole batches."""
    count = os.cpu_count() or 1
    try:
        affinity = len(os.sched_getaffinity(0)) or count
    except (AttributeError, OSError):  # not offered on every platform
        affinity = count
    quota = cgroup_cpu_quota(root, self_cgroup)
    limits = [count, affinity] + ([max(1, math.floor(quota))] if quota is not None else [])
    return min(limits)


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
    """Settings every handler understands."""

    # Torch intra-op threads per worker; 0 means "CPUs / workers in the fleet" so that
    # workers x threads never oversubscribe the machine (that costs several-fold throughput).
    # The CPUs are those this process may use (available_cpus): in a pod, its quota and
    # cpuset, not the node's count.
    torch_threads: int = 0
    fleet_workers: int = 1
    amp_cuda: str = "fp16"
    # off, bf16, or auto: bf16 where the CPU computes it natively, off where it would emulate it.
    amp_cpu: str = "off"
    compile: bool = False
    compile_mode: str = "default"
    # Debug mode skips torch.compile so stack traces point at eager code.
    debug: bool = False
    # Warm-up batch sizes run at load time, so the first client never pays for lazy init.
    warmup_batch_sizes: tuple[int, ...] = (1,)
    cuda_cleanup_every: int = 0
    cuda_cleanup_threshold_mb: float = 0.0
    # Where the worker reports its counters for the recycler ("" = <tmp>/tsfleet-workers).
    report_dir: str = ""

    def threads(self, cpu_count: int | None = None) -> int:
        """Resolved torch thread count for this worker."""
        if self.torch_threads > 0:
            return self.torch_threads
        cores = cpu_count or available_cpus()
        return max(1, cores // max(1, self.fleet_workers))


def _coerce(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"handler setting {name!r} must be true or false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"handler setting {name!r} must be an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"handler setting {name!r} must be a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
        ):
            raise ValueError(f"handler setting {name!r} must be a list of positive integers")
        return tuple(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise ValueError(f"handler setting {name!r} must be a string, got {value!r}")
        return value
    return value


def parse_settings(
    raw: Mapping[str, Any] | None, options: Mapping[str, Any]
) -> tuple[RuntimeSettings, dict[str, Any]]:
    """Split ``raw`` into runtime settings and model options; raise ValueError on bad keys."""
    raw = dict(raw or {})
    fields = {f.name: f.default for f in dataclasses.fields(RuntimeSettings)}
    unknown = sorted(set(raw) - set(fields) - set(options))
    if unknown:
        known = ", ".join(sorted(set(fields) | set(options)))
        raise ValueError(f"unknown handler setting(s) {', '.join(unknown)}; known: {known}")
    runtime = RuntimeSettings(
        **{k: _coerce(k, raw[k], fields[k]) for k in fields if k in raw}
    )
    for key, allowed in (("amp_cuda", AMP_DTYPES), ("amp_cpu", AMP_CPU)):
        if getattr(runtime, key) not in allowed:
            raise ValueError(f"handler setting {key!r} must be one of {', '.join(allowed)}")
    if runtime.compile_mode not in COMPILE_MODES:
        raise ValueError(f"handler setting 'compile_mode' must be one of {', '.join(COMPILE_MODES)}")
    model_opts = {k: _coerce(k, raw.get(k, d), d) for k, d in options.items()}
    return runtime, model_opts
