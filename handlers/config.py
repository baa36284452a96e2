"""Typed handler settings, read from the ``handler:`` section of the .mar's model-config.yaml.

Every model shares the runtime settings below; a handler subclass adds its own keys with
defaults in its ``OPTIONS`` class attribute. Unknown keys fail the model's load with a
message that names them, so a typo in the manifest cannot silently fall back to a default.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

AMP_DTYPES = ("off", "fp16", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
    """Settings every handler understands."""

    # Torch intra-op threads per worker; 0 means "cores / workers in the fleet" so that
    # workers x threads never oversubscribe the machine (that costs several-fold throughput).
    torch_threads: int = 0
    fleet_workers: int = 1
    amp_cuda: str = "fp16"
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
        cores = cpu_count or os.cpu_count() or 1
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
    for key, allowed in (("amp_cuda", AMP_DTYPES), ("amp_cpu", ("off", "bf16"))):
        if getattr(runtime, key) not in allowed:
            raise ValueError(f"handler setting {key!r} must be one of {', '.join(allowed)}")
    if runtime.compile_mode not in COMPILE_MODES:
        raise ValueError(f"handler setting 'compile_mode' must be one of {', '.join(COMPILE_MODES)}")
    model_opts = {k: _coerce(k, raw.get(k, d), d) for k, d in options.items()}
    return runtime, model_opts
