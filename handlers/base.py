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
from handlers.errors import BadInput, HandlerError, InternalError, PayloadTooLarge, UnsupportedMediaType
from handlers.lifecycle import WorkerLifecycle
from handlers.payload import FORM_TYPES, JsonLimits, Payload, extract
from handlers.runtime import (CudaCleanup, HandlerMetrics, autocast_for, pick_device, quiet_bad_input_logs,
                              resolve_amp_cpu)

log = logging.getLogger(__name__)

JSON_TYPE = "application/json"
FORM_HINT = " (curl -d sends a form: give the body its real type, e.g. -H 'Content-Type: application/json')"


def dumps(obj: Any) -> bytes:
    """Compact JSON: TorchServe would pretty-print a returned dict, which costs on big outputs."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class FleetHandler:
    """Base handler. Subclasses set class attributes and override hooks."""

    #: Model-specific settings (name -> default) accepted in model-config.yaml ``handler:``;
    #: the size limits a client can hit (texts, characters, pixels, bytes) are among them.
    OPTIONS: ClassVar[dict[str, Any]] = {}
    #: Media types a request body may have ("" is a body sent without one, as over gRPC);
    #: any other is answered 415 naming these. Empty: the handler's decode decides alone.
    ACCEPTS: ClassVar[tuple[str, ...]] = ()
    #: How deeply nested, and how long a number, a JSON body may be (400 past either).
    JSON_LIMITS: ClassVar[JsonLimits] = JsonLimits()
    #: How the default ``postprocess`` wraps an item's rows: an item that carried one input
    #: (``item.single``) answers ``{ONE_KEY: row}`` (the row itself when None), one that carried
    #: a list answers ``{MANY_KEY: rows}``. Items without ``single`` answer their one row.
    ONE_KEY: ClassVar[str | None] = None
    MANY_KEY: ClassVar[str] = "predictions"

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
        """One JSON-able answer per item: the output's rows in order (``answer_row`` each), an
        item taking as many as it carried inputs (``item.inputs``, else one)."""
        rows = [self.answer_row(row) for row in output.cpu().tolist()]
        answers, at = [], 0
        for item in items:
            n = getattr(item, "inputs", 1)
            chunk, at = rows[at : at + n], at + n
            if not getattr(item, "single", True):
                answers.append({self.MANY_KEY: chunk})
            else:
                answers.append(chunk[0] if self.ONE_KEY is None else {self.ONE_KEY: chunk[0]})
        return answers

    def answer_row(self, row: list[float]) -> Any:
        """What one row of the model's output answers (the default postprocess calls it)."""
        return row

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
        settings, self.options = parse_settings(config.get("handler"), self.OPTIONS)
        self.settings = resolve_amp_cpu(settings)  # auto: bf16 or off, as this CPU computes
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
            if self.compiled:
                self.model = torch.compile(self.model, mode=self.settings.compile_mode)
        started = time.perf_counter()
        for size in self._warmup_sizes(context):
            items = self.warmup_items(size)
            if items:
                self._run(items)
        log.info(
            "%s %s ready on %s: %d torch threads, amp=%s, compile=%s, warm-up %.0f ms",
            self.model_name, self.version, self.device, threads,
            self.settings.amp_cuda if self.device.type == "cuda" else self.settings.amp_cpu,
            self.compiled,
            (time.perf_counter() - started) * 1000,
        )
        self.initialized = True

    @property
    def padded(self) -> bool:
        """Whether a text model runs padded batches rather than packed ones (``TokenBatch``).
        Packed saves the padding's work on a CPU (1.23x at fp32 on the benchmark's sentences);
        a compiled encoder needs padded shapes (a per-text loop compiles per length mix), and on
        a GPU padding costs little while a per-text loop launches a kernel per text and layer."""
        return self.compiled or self.device.type != "cpu"

    @property
    def compiled(self) -> bool:
        """Whether the model is (to be) ``torch.compile``d: on, and not in debug."""
        return bool(self.settings.compile and not self.settings.debug)

    def _warmup_sizes(self, context: Any) -> list[int]:
        """The configured warm-up batch sizes; compiled, also a batch of one and one of
        TorchServe's batch_size (at least 2: a text request may carry a list), so that the
        worker is READY only once every graph it serves is compiled, whatever the manifest's
        ``warmup_batch_sizes`` say."""
        sizes = set(self.settings.warmup_batch_sizes)
        if self.compiled:
            sizes |= {1, max(2, int(context.system_properties.get("batch_size") or 1))}
        return sorted(sizes)

    def _run(self, items: list[Any]) -> tuple[list[Any], float, float, float]:
        phase = "preprocess"
        try:
            t0 = time.perf_counter()
            batch = self.preprocess(items)
            t1 = time.perf_counter()
            phase = "inference"
            with torch.inference_mode(), autocast_for(self.device, self.settings):
                output = self.inference(batch)
            t2 = time.perf_counter()
            phase = "postprocess"
            answers = self.postprocess(output, items)
            if len(answers) != len(items):
                raise AnswerCountMismatch(len(answers), len(items))
            t3 = time.perf_counter()
        except Exception as exc:
            raise BatchFailed(phase, exc) from exc
        return answers, (t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000

    def handle(self, data: list[dict], context: Any) -> list[bytes]:
        """TorchServe entry point per batch: one answer per request, errors per item.

        Isolation by construction: whatever one request's bytes do while they are read
        becomes that request's own 4xx, and a batch whose forward pass raises is run again
        in halves until only the request that fails gets an error. Nothing raised here can
        reach TorchServe, which would answer 503 to every request of the batch.
        """
        answers: list[bytes | None] = [None] * len(data)
        good: list[int] = []
        items: list[Any] = []
        batch_size = str(len(data))
        rejected = [0]
        for idx, request in enumerate(data):
            context.set_response_content_type(idx, JSON_TYPE)
            # Lets an operator (and the tests) see how requests were batched.
            context.set_response_header(idx, "X-Batch-Size", batch_size)
            try:
                items.append(self._decode(request, context.get_all_request_header(idx)))
                good.append(idx)
            except Exception as exc:  # noqa: BLE001 - a client's bytes caused it: its own answer
                answers[idx] = self._reject(context, idx, self._client_error(exc), rejected)
        timings = self._answer(context, good, items, answers, rejected) if items else (0.0, 0.0, 0.0)
        try:
            self.metrics.batch(len(data), *timings, rejected[0])
            self.metrics.memory(self.device)
            if self.cleanup.after(len(data)):
                self.metrics.cleanup()
            self.lifecycle.after_batch(len(data))
        except Exception:  # noqa: BLE001 - bookkeeping (a full disk) must not fail answered requests
            log.warning("%s %s: bookkeeping after a batch failed", self.model_name, self.version, exc_info=True)
        return answers  # type: ignore[return-value]

    def _decode(self, request: Any, headers: Any) -> Any:
        payload = extract(request, headers, self.JSON_LIMITS)
        if self.ACCEPTS and payload.media_type not in self.ACCEPTS and not (
            payload.media_type.endswith("+json") and "application/json" in self.ACCEPTS
        ):
            named = ", ".join(t or "none" for t in self.ACCEPTS)
            hint = FORM_HINT if payload.media_type in FORM_TYPES else ""
            raise UnsupportedMediaType(f"content type {payload.media_type!r} is not accepted; send one of: {named}{hint}")
        return self.decode(payload)

    def _answer(self, context: Any, idxs: list[int], items: list[Any], answers: list[bytes | None],
                rejected: list[int]) -> tuple[float, float, float]:
        """Answer ``items`` as one batch; should it raise, answer each half on its own."""
        try:
            results, pre, infer, post = self._run(items)
            encoded = [dumps(result) for result in results]
        except Exception as exc:  # noqa: BLE001 - retried below so that only its cause fails
            failure: Exception | None = exc
        else:
            failure = None
        if failure is None:
            for idx, answer in zip(idxs, encoded):
                answers[idx] = answer
            return pre, infer, post
        if len(items) == 1:
            answers[idxs[0]] = self._reject(context, idxs[0], self._failed_alone(failure), rejected)
            return 0.0, 0.0, 0.0
        # Outside the except block, so a traceback logged further down is its own alone.
        log.warning("%s %s: a batch of %d failed (%s); answering it in halves",
                    self.model_name, self.version, len(items), _short(failure))
        mid = len(items) // 2
        first = self._answer(context, idxs[:mid], items[:mid], answers, rejected)
        second = self._answer(context, idxs[mid:], items[mid:], answers, rejected)
        return first[0] + second[0], first[1] + second[1], first[2] + second[2]

    def _client_error(self, exc: Exception) -> HandlerError:
        """The answer for an exception raised while one request was read: its bytes caused it."""
        if isinstance(exc, HandlerError):
            return exc
        if isinstance(exc, RecursionError):
            error: HandlerError = BadInput("the request is nested too deeply to read")
        elif isinstance(exc, MemoryError):
            error = PayloadTooLarge("the request is too large to read")
        else:
            error = BadInput(f"the request could not be read ({_short(exc)})")
        # One line, no traceback: a client's bytes, not a fault of this worker.
        log.warning("%s %s: request answered %d: %s was not foreseen while reading it",
                    self.model_name, self.version, error.code, type(exc).__name__)
        return error

    def _failed_alone(self, exc: Exception) -> HandlerError:
        """The answer for one request that failed even alone in its batch."""
        cause = exc.cause if isinstance(exc, BatchFailed) else exc
        if isinstance(cause, HandlerError):
            return cause
        if isinstance(exc, BatchFailed) and exc.phase == "preprocess":
            return self._client_error(cause)  # turning its decoded input into tensors
        if isinstance(cause, AnswerCountMismatch):
            # The handler's own fault, whatever the request: say so, not "prediction failed".
            log.error("%s %s: %s; the request is answered 500", self.model_name, self.version, cause)
            return InternalError(f"the handler's postprocess gave {cause.answers} answers for this one request; "
                                 "it must give one per request (a fault of the handler, not of the request)")
        log.error("%s %s: %s failed for one request", self.model_name, self.version,
                  getattr(exc, "phase", "answering"), exc_info=cause)
        return InternalError(f"prediction failed for this request ({type(cause).__name__}); "
                             "the other requests of its batch were answered")

    def _reject(self, context: Any, idx: int, exc: HandlerError, rejected: list[int]) -> bytes:
        rejected[0] += 1
        context.set_response_status(exc.code, exc.type, idx)
        return exc.body(self.model_name, self.version)


class AnswerCountMismatch(RuntimeError):
    """``postprocess`` gave a number of answers other than its items': a fault of the handler."""

    def __init__(self, answers: int, items: int):
        super().__init__(f"postprocess gave {answers} answers for {items} items")
        self.answers, self.items = answers, items


class BatchFailed(Exception):
    """A hook raised while a batch was answered; ``phase`` names the hook."""

    def __init__(self, phase: str, cause: Exception):
        super().__init__(f"{phase} failed: {_short(cause)}")
        self.phase, self.cause = phase, cause


def _short(exc: BaseException, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."
