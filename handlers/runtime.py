"""Per-worker runtime pieces the base handler composes: device and AMP choice, CUDA memory
cleanup policy and handler metrics. Each is a no-op where it does not apply (CPU, no metrics)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any

import torch

from handlers.config import RuntimeSettings

log = logging.getLogger(__name__)

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# A TorchServe left at decode_input_request=true (tsfleet's config turns it off) logs these,
# with a traceback, for every body it cannot parse as JSON or text, before the handler answers
# it 400 naming the problem: 1-2 KB of log per bad request.
_BAD_INPUT_LINES = ("Failed json decoding of input data", "Failed utf-8 decoding of input data")


def _not_bad_json(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_BAD_INPUT_LINES)


def quiet_bad_input_logs() -> None:
    """Drop TorchServe's per-request traceback for unparsable JSON (the access log has the 400)."""
    root = logging.getLogger()
    if _not_bad_json not in root.filters:
        root.addFilter(_not_bad_json)


def pick_device(gpu_id: Any) -> torch.device:
    """The worker's GPU when TorchServe assigned one and CUDA is present, else the CPU."""
    if gpu_id is not None and torch.cuda.is_available():
        return torch.device(f"cuda:{int(gpu_id)}")
    return torch.device("cpu")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU computes bf16 in hardware: x86's AVX512-BF16 or AMX, Arm's BF16."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_amp_cpu(settings: RuntimeSettings, native_bf16: bool | None = None) -> RuntimeSettings:
    """``amp_cpu: auto`` made concrete for this CPU: bf16 where it computes bf16 natively (MiniLM
    then does 2.3x fp32's work, its embeddings within a cosine of 0.99996 of fp32's:
    docs/benchmarks-precision.md), off where bf16 would be emulated (4-7x slower than fp32)."""
    if settings.amp_cpu != "auto":
        return settings
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    return dataclasses.replace(settings, amp_cpu="bf16" if native else "off")


def autocast_for(device: torch.device, settings: RuntimeSettings) -> contextlib.AbstractContextManager:
    """Autocast with the configured dtype for this device, or a null context when AMP is off."""
    name = settings.amp_cuda if device.type == "cuda" else settings.amp_cpu
    if name == "off":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[name])


class CudaCleanup:
    """Frees cached CUDA blocks every N requests, or once reserved-minus-allocated passes a threshold.

    Freeing the cache costs the next batch a fresh cudaMalloc, so it is a policy, not a habit.
    """

    def __init__(self, device: torch.device, every: int, threshold_mb: float):
        self.enabled = device.type == "cuda" and (every > 0 or threshold_mb > 0)
        self.device = device
        self.every = every
        self.threshold = threshold_mb * 2**20
        self.since_last = 0
        self.count = 0

    def after(self, n_requests: int) -> bool:
        """Account for ``n_requests`` just served; return True when the cache was emptied."""
        if not self.enabled:
            return False
        self.since_last += n_requests
        due = self.every > 0 and self.since_last >= self.every
        if not due and self.threshold > 0:
            slack = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            due = slack > self.threshold
        if due:
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()
            self.since_last = 0
            self.count += 1
        return due


def process_rss_mb() -> float:
    """Resident set size of this worker process in MiB (Linux /proc; psutil elsewhere)."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import psutil  # shipped with TorchServe

        return psutil.Process().memory_info().rss / 2**20


class HandlerMetrics:
    """Thin wrapper over TorchServe's metrics cache; silently absent when the context has none."""

    def __init__(self, metrics: Any, version: str):
        self._metrics = metrics
        self._version = version
        if metrics is not None:
            from ts.metrics.dimension import Dimension
            from ts.metrics.metric_type_enum import MetricTypes

            self._dim = Dimension
            self._types = MetricTypes

    def _add(self, name: str, value: float, unit: str, kind: str, **dims: str) -> None:
        if self._metrics is None:
            return
        dimensions = [self._dim("ModelVersion", self._version)]
        dimensions += [self._dim(k, v) for k, v in dims.items()]
        try:
            self._metrics.add_metric(
                name, value, unit, dimensions=dimensions, metric_type=getattr(self._types, kind)
            )
        except Exception:  # metrics must never fail a prediction
            log.warning("could not record metric %s", name, exc_info=True)

    def batch(self, size: int, pre_ms: float, infer_ms: float, post_ms: float, errors: int) -> None:
        # A counter per observed batch size is a histogram with exact buckets (<= batch_size of them).
        self._add("HandlerBatches", 1, "count", "COUNTER", BatchSize=str(size))
        self._add("HandlerRequests", size, "count", "COUNTER")
        if errors:
            self._add("HandlerRejected", errors, "count", "COUNTER")
        self._add("HandlerPreprocessMs", pre_ms, "ms", "GAUGE")
        self._add("HandlerInferenceMs", infer_ms, "ms", "GAUGE")
        self._add("HandlerPostprocessMs", post_ms, "ms", "GAUGE")

    def memory(self, device: torch.device) -> None:
        self._add("HandlerRssMB", process_rss_mb(), "MB", "GAUGE")
        if device.type == "cuda":
            self._add("HandlerCudaAllocatedMB", torch.cuda.memory_allocated(device) / 2**20, "MB", "GAUGE")
            self._add("HandlerCudaReservedMB", torch.cuda.memory_reserved(device) / 2**20, "MB", "GAUGE")

    def cleanup(self) -> None:
        self._add("HandlerCudaCleanups", 1, "count", "COUNTER")
