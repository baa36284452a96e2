"""FleetHandler: the one base every model handler in the fleet extends.

It owns what every model needs (per-item validation with its own 4xx, one batched forward
pass under ``torch.inference_mode`` and autocast, thread budget, optional ``torch.compile``
after a warm-up, CUDA cleanup, metrics, compact JSON answers). A model handler overrides
only the hooks it changes: ``load``, ``decode``, ``preprocess``, ``inference``,
``postprocess`` and ``warmup_items``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, ClassVar

import torch

from handlers.config import RuntimeSettings, parse_settings
from handlers.errors import HandlerError
from handlers.lifecycle import WorkerLifecycle
from handlers.payload import Payload, extract
from handlers.runtime import CudaCleanup, HandlerMetrics, autocast_for, pick_device, quiet_bad_input_logs

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"


def dumps(obj: Any) -> bytes:
    """Compact JSON: TorchServe would pretty-print a returned dict, which costs on big outputs."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class FleetHandler:
    """Base handler. Subclasses set class attributes and override hooks."""

    #: Model-specific settings (name -> default) accepted in model-config.yaml ``handler:``.
    OPTIONS: ClassVar[dict[str, Any]] = {}

    def __init__(self) -> None:
        self.initialized = False
        self.model: torch.nn.Module | None = None
        self.model_name = "unknown"
        self.version = "unknown"
        self.device = torch.device("cpu")
        self.settings = RuntimeSettings()
        self.options: dict[str, Any] = {}

    # ----------------------------------------------------------------- hooks
    def load(self, model_dir: Path) -> None:
        """Load weights from the unpacked archive; set ``self.model`` to what should be compiled."""
        raise NotImplementedError

    def decode(self, payload: Payload) -> Any:
        """Validate one request and return the item ``preprocess`` takes; raise HandlerError."""
        raise NotImplementedError

    def preprocess(self, items: list[Any]) -> Any:
        """Turn the decoded items of one batch into model input."""
        raise NotImplementedError

    def inference(self, batch: Any) -> Any:
        """One forward pass; runs under inference_mode and autocast."""
        assert self.model is not None
        return self.model(batch)

    def postprocess(self, output: Any, items: list[Any]) -> list[Any]:
        """One JSON-able answer per item."""
        raise NotImplementedError

    def warmup_items(self, batch_size: int) -> list[Any]:
        """Representative decoded items used to warm up (and compile) at load time."""
        return []

    @classmethod
    def sample_request(cls) -> tuple[str, bytes] | None:
        """A valid request (content type, body) that ``tsfleet up`` sends a few times once the
        fleet is ready, so the first client request finds the serving path (TorchServe's
        frontend, the worker protocol, the answer's encoding) warm, not just the model."""
        return None

    # ------------------------------------------------------------ lifecycle
    def initialize(self, context: Any) -> None:
        """TorchServe entry point at load: settings, threads, device, weights, compile, warm-up."""
        self.context = context
        self.model_name = context.model_name
        quiet_bad_input_logs()
        manifest = context.manifest or {}
        self.version = str(manifest.get("model", {}).get("modelVersion", "unknown"))
        config = getattr(context, "model_yaml_config", None) or {}
        self.settings, self.options = parse_settings(config.get("handler"), self.OPTIONS)
        threads = self.settings.threads()
        torch.set_num_threads(threads)
        self.device = pick_device(context.system_properties.get("gpu_id"))
        self.metrics = HandlerMetrics(getattr(context, "metrics", None), self.version)
        self.cleanup = CudaCleanup(
            self.device, self.settings.cuda_cleanup_every, self.settings.cuda_cleanup_threshold_mb
        )
        self.lifecycle = WorkerLifecycle(self.settings.report_dir, self.model_name, self.version, self.device)
        self.load(Path(context.system_properties.get("model_dir", ".")))
        if self.model is not None:
            self.model.eval()
            if self.settings.compile and not self.settings.debug:
                self.model = torch.compile(self.model, mode=self.settings.compile_mode)
        started = time.perf_counter()
        for size in self.settings.warmup_batch_sizes:
            items = self.warmup_items(size)
            if items:
                self._run(items)
        log.info(
            "%s %s ready on %s: %d torch threads, amp=%s, compile=%s, warm-up %.0f ms",
            self.model_name, self.version, self.device, threads,
            self.settings.amp_cuda if self.device.type == "cuda" else self.settings.amp_cpu,
            self.settings.compile and not self.settings.debug,
            (time.perf_counter() - started) * 1000,
        )
        self.initialized = True

    def _run(self, items: list[Any]) -> tuple[list[Any], float, float, float]:
        t0 = time.perf_counter()
        batch = self.preprocess(items)
        t1 = time.perf_counter()
        with torch.inference_mode(), autocast_for(self.device, self.settings):
            output = self.inference(batch)
        t2 = time.perf_counter()
        answers = self.postprocess(output, items)
        t3 = time.perf_counter()
        return answers, (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000

    def handle(self, data: list[dict], context: Any) -> list[bytes]:
        """TorchServe entry point per batch: one answer per request, errors per item."""
        answers: list[bytes | None] = [None] * len(data)
        good: list[int] = []
        items: list[Any] = []
        batch_size = str(len(data))
        for idx, request in enumerate(data):
            context.set_response_content_type(idx, JSON_TYPE)
            # Lets an operator (and the tests) see how requests were batched.
            context.set_response_header(idx, "X-Batch-Size", batch_size)
            try:
                items.append(self.decode(extract(request, context.get_all_request_header(idx))))
                good.append(idx)
            except HandlerError as exc:
                answers[idx] = self._reject(context, idx, exc)
        pre = infer = post = 0.0
        if items:
            results, pre, infer, post = self._run(items)
            for idx, result in zip(good, results):
                answers[idx] = dumps(result)
        self.metrics.batch(len(data), pre, infer, post, len(data) - len(items))
        self.metrics.memory(self.device)
        if self.cleanup.after(len(data)):
            self.metrics.cleanup()
        self.lifecycle.after_batch(len(data))
        return answers  # type: ignore[return-value]

    def _reject(self, context: Any, idx: int, exc: HandlerError) -> bytes:
        context.set_response_status(exc.code, exc.type, idx)
        return exc.body(self.model_name, self.version)

