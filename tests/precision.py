"""How close a served answer must come to fp32's: fp32's own tolerance, or bf16's stated bound
where the model's fleet.yaml settings make its workers run bf16 on this CPU (``amp_cpu: bf16``,
or ``auto`` on a CPU with native bf16: handlers/runtime.py resolve_amp_cpu). The bound is the
one tests/unit/test_handlers.py holds bf16 to and docs/benchmarks-precision.md measures."""
from __future__ import annotations

from benchmarks.speed.precision import BF16_MAX_DEVIATION as BF16_BOUND
from handlers.config import RuntimeSettings
from handlers.runtime import resolve_amp_cpu
from tsfleet.manifest import Fleet


def runs_bf16(fleet: Fleet, model: str) -> bool:
    """Whether ``model``'s default version answers in bf16 on this machine."""
    spec = fleet.models[model].versions[fleet.models[model].default_version]
    return resolve_amp_cpu(RuntimeSettings(amp_cpu=spec.settings.get("amp_cpu", "off"))).amp_cpu == "bf16"


def tolerance(fleet: Fleet, model: str, fp32: float) -> float:
    """``fp32``, or bf16's bound where ``model`` runs bf16 here."""
    return max(fp32, BF16_BOUND) if runs_bf16(fleet, model) else fp32
