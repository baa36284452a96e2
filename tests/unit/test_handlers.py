"""Handlers in process, with TorchServe's own Context: per-item errors, settings, AMP, compile."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from ts.context import Context, RequestProcessor

from handlers.config import RuntimeSettings, parse_settings
from handlers.image_classifier import ImageClassifier
from handlers.intent_classifier import IntentClassifier
from handlers.lifecycle import WorkerLifecycle
from handlers.runtime import CudaCleanup, cpu_has_native_bf16, resolve_amp_cpu
from handlers.shapes import draw_shape
from handlers.text_embedder import TextEmbedder
from tests.polling import wait_for
from tsfleet.manifest import load_fleet
from tsfleet.build.recipes import RECIPES, ensure

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "build" / "artifacts"
REPORTS = tempfile.mkdtemp(prefix="tsfleet-test-reports-")


class RecordingMetrics:
    """Stands in for TorchServe's metrics cache and remembers what was recorded."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, dict]] = []

    def add_metric(self, name, value, unit, idx=None, dimensions=(), metric_type=None):
        self.calls.append((name, value, {d.name: d.value for d in dimensions}))


def artifacts(model: str, version: str = "1.0") -> Path:
    spec = load_fleet(ROOT / "fleet.yaml").models[model].versions[version]
    return ensure(RECIPES[spec.recipe], spec.params, CACHE / f"{model}-{version}", lambda line: None, CACHE)


def make_context(model: str, model_dir: Path, settings: dict | None = None, metrics: Any = None,
                 gpu_id: int | None = None) -> Context:
    return Context(model, str(model_dir), {"model": {"modelVersion": "1.0"}}, 8, gpu_id, "0.12.0",
                   metrics=metrics, model_yaml_config={"handler": {"warmup_batch_sizes": [1], "report_dir": REPORTS,
                                                     **(settings or {})}})


def run(handler, context: Context, requests: list[tuple[Any, str]]) -> list[tuple[int, Any]]:
    """Send one batch; return (status, parsed body) per request."""
    context.request_processor = [RequestProcessor({"body": {"content-type": ct}}) for _, ct in requests]
    out = handler.handle([{"body": body} for body, _ in requests], context)
    assert len(out) == len(requests)
    return [(context.get_response_status(i)[0], json.loads(raw)) for i, raw in enumerate(out)]


@pytest.fixture(scope="module")
def embedder_dir() -> Path:
    return artifacts("text-embedder")


def load(cls, model: str, model_dir: Path, gpu_id: int | None = None, **settings):
    """An initialized handler and its context; ``gpu_id`` as TorchServe passes it to a GPU worker."""
    handler, ctx = cls(), make_context(model, model_dir, settings, RecordingMetrics(), gpu_id)
    handler.initialize(ctx)
    return handler, ctx


def test_bad_item_gets_its_own_4xx_and_batch_mates_their_answers(embedder_dir) -> None:
    handler, ctx = load(TextEmbedder, "text-embedder", embedder_dir)
    results = run(handler, ctx, [
        ({"text": "hello world"}, "application/json"),
        (b'{"text": ', "application/json"),
        ("plain text body", "text/plain"),
        ({"text": ""}, "application/json"),
        ({"text": ["a", "b"]}, "application/json"),
    ])
    assert [code for code, _ in results] == [200, 400, 200, 400, 200]
    assert len(results[0][1]["embedding"]) == 384 and len(results[4][1]["embeddings"]) == 2
    assert results[1][1]["message"].startswith("text-embedder 1.0: malformed JSON")
    names = [name for name, _, _ in ctx.metrics.calls]
    assert "HandlerBatches" in names and "HandlerRssMB" in names and "HandlerRejected" in names
    batch = next(dims for name, _, dims in ctx.metrics.calls if name == "HandlerBatches")
    assert batch == {"ModelVersion": "1.0", "BatchSize": "5"}


def test_same_text_same_embedding_alone_or_in_a_padded_batch(embedder_dir) -> None:
    handler, ctx = load(TextEmbedder, "text-embedder", embedder_dir)
    alone = run(handler, ctx, [({"text": "short"}, "application/json")])[0][1]["embedding"]
    batched = run(handler, ctx, [({"text": "short"}, "application/json"),
                                 ({"text": "a much longer sentence " * 10}, "application/json")])[0][1]["embedding"]
    assert max(abs(a - b) for a, b in zip(alone, batched)) < 1e-5


def test_bf16_autocast_on_cpu_stays_within_the_stated_bound(embedder_dir) -> None:
    # The bound docs/benchmarks-precision.md states for bf16 (measured there: cosine 0.99996,
    # largest difference 1.5e-3), over the speed suite's sentences, emulated or native alike.
    from benchmarks.speed.precision import BF16_MAX_DEVIATION, MIN_COSINE
    from benchmarks.speed.workload import sentences

    fp32, ctx32 = load(TextEmbedder, "text-embedder", embedder_dir)
    bf16, ctx16 = load(TextEmbedder, "text-embedder", embedder_dir, amp_cpu="bf16")
    req = [({"text": sentences()[:64]}, "application/json")]
    a = torch.tensor(run(fp32, ctx32, req)[0][1]["embeddings"])
    b = torch.tensor(run(bf16, ctx16, req)[0][1]["embeddings"])
    assert a.shape == b.shape and a.shape[0] > 8
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() >= MIN_COSINE
    assert (a - b).abs().max() <= BF16_MAX_DEVIATION


def test_amp_cpu_auto_is_bf16_only_where_the_cpu_computes_it(embedder_dir, tmp_path) -> None:
    assert resolve_amp_cpu(RuntimeSettings(amp_cpu="auto"), native_bf16=True).amp_cpu == "bf16"
    assert resolve_amp_cpu(RuntimeSettings(amp_cpu="auto"), native_bf16=False).amp_cpu == "off"
    assert resolve_amp_cpu(RuntimeSettings(amp_cpu="off"), native_bf16=True).amp_cpu == "off"  # said: kept
    for flags, native in (("fpu avx2 avx512f avx512_bf16", True), ("fpu amx_bf16 amx_tile", True),
                          ("fpu avx2 avx512f avx512_vnni", False)):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        assert cpu_has_native_bf16.__wrapped__(tmp_path / "cpuinfo") is native, flags
    (tmp_path / "cpuinfo").write_text("Features\t: fp asimd bf16 i8mm\n")  # Arm
    assert cpu_has_native_bf16.__wrapped__(tmp_path / "cpuinfo") is True
    assert cpu_has_native_bf16.__wrapped__(tmp_path / "absent") is False
    # A worker resolves it at load: what it runs is what it logs and reports.
    handler, _ = load(TextEmbedder, "text-embedder", embedder_dir, amp_cpu="auto")
    assert handler.settings.amp_cpu == ("bf16" if cpu_has_native_bf16() else "off")
    with pytest.raises(ValueError, match="'amp_cpu' must be one of off, bf16, auto"):
        parse_settings({"amp_cpu": "fp16"}, {})


def test_unknown_setting_fails_the_load_naming_it(embedder_dir) -> None:
    with pytest.raises(ValueError, match="unknown handler setting.*max_txts"):
        load(TextEmbedder, "text-embedder", embedder_dir, max_txts=4)


def test_thread_budget_never_oversubscribes_the_cores() -> None:
    assert RuntimeSettings(fleet_workers=6).threads(cpu_count=2) == 1
    assert RuntimeSettings(fleet_workers=2).threads(cpu_count=16) == 8
    assert RuntimeSettings(torch_threads=3, fleet_workers=6).threads(cpu_count=2) == 3
    runtime, options = parse_settings({"compile": True, "top_k": 2}, {"top_k": 3})
    assert runtime.compile and options == {"top_k": 2}


def test_cuda_cleanup_is_a_no_op_on_cpu() -> None:
    cleanup = CudaCleanup(torch.device("cpu"), every=1, threshold_mb=1)
    assert not cleanup.enabled and cleanup.after(100) is False


def test_intent_classifier_mixes_texts_and_embeddings_in_one_batch(embedder_dir) -> None:
    embedder, ectx = load(TextEmbedder, "text-embedder", embedder_dir)
    vec = run(embedder, ectx, [({"text": "will it snow in Oslo tomorrow"}, "application/json")])[0][1]["embedding"]
    handler, ctx = load(IntentClassifier, "intent-classifier", artifacts("intent-classifier"))
    results = run(handler, ctx, [
        ({"embedding": vec}, "application/json"),
        ({"text": ["I want a refund for this charge", "hi!"]}, "application/json"),
        ({"embedding": vec[:10]}, "application/json"),
        ({"text": "cancel my hotel booking please"}, "application/json"),
    ])
    assert [c for c, _ in results] == [200, 200, 400, 200]
    assert results[0][1]["intent"] == "weather"
    assert [p["intent"] for p in results[1][1]["predictions"]] == ["billing", "greeting"]
    assert "384 numbers" in results[2][1]["message"]
    assert results[3][1]["intent"] == "cancel"


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_compiled_image_model_matches_eager_and_is_warm_at_load() -> None:
    model_dir = artifacts("image-classifier")
    eager, ectx = load(ImageClassifier, "image-classifier", model_dir)
    # Only 4 configured: the handler itself warms a batch of one and one of TorchServe's
    # batch_size (8 here), so no batch size up to it compiles on a request.
    compiled, cctx = load(ImageClassifier, "image-classifier", model_dir, compile=True, warmup_batch_sizes=[4])
    assert type(compiled.model).__name__ == "OptimizedModule"
    rng = random.Random(5)
    reqs = [(_png(draw_shape(label, rng)), "image/png") for label in ("circle", "square", "triangle", "circle")]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for size in range(1, 9):
        run(compiled, cctx, reqs[:1] * size)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "compiled on a request"
    got, want = run(compiled, cctx, reqs), run(eager, ectx, reqs)
    for (c1, a), (c2, b) in zip(got, want):
        assert c1 == c2 == 200 and a["label"] == b["label"]
        assert abs(a["score"] - b["score"]) < 1e-4
    debug, _ = load(ImageClassifier, "image-classifier", model_dir, compile=True, debug=True)
    assert type(debug.model).__name__ != "OptimizedModule"


def test_worker_reports_its_counters_for_the_recycler(embedder_dir) -> None:
    handler, ctx = load(TextEmbedder, "text-embedder", embedder_dir)
    run(handler, ctx, [({"text": "a"}, "application/json")] * 3)
    handler.lifecycle.report()
    doc = json.loads(handler.lifecycle.path.read_text())
    assert doc["requests"] >= 3 and doc["rss_mb"] > 50 and doc["pid"] == os.getpid()
    assert handler.lifecycle.path.parent == Path(REPORTS) / "text-embedder" / "1.0"


def test_the_last_requests_before_a_quiet_spell_reach_the_report(embedder_dir) -> None:
    # A batch reports at most twice a second; the requests after the last such report must
    # reach the recycler all the same, though no further batch comes to write them.
    handler, ctx = load(TextEmbedder, "text-embedder", embedder_dir)
    handler.lifecycle.report()
    run(handler, ctx, [({"text": "a"}, "application/json")] * 2)
    served = handler.lifecycle.requests
    wait_for("the report's request count catching up",
             lambda: json.loads(handler.lifecycle.path.read_text())["requests"] == served, 10)


def test_a_starting_worker_removes_what_killed_workers_left(tmp_path: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid no process has now
    version_dir = tmp_path / "m" / "1.0"
    version_dir.mkdir(parents=True)
    dead = [version_dir / f"{gone.pid}{suffix}" for suffix in (".json", ".state", ".retire", ".77.tmp")]
    alive = version_dir / f"{os.getppid()}.json"  # another live worker's report stays
    for path in (*dead, alive):
        path.write_text("{}")
    lifecycle = WorkerLifecycle(str(tmp_path), "m", "1.0", torch.device("cpu"))
    assert not any(p.exists() for p in dead)
    assert alive.exists() and lifecycle.path.exists()


@pytest.mark.parametrize("cls,model", [(TextEmbedder, "text-embedder"), (IntentClassifier, "intent-classifier"),
                                       (ImageClassifier, "image-classifier")])
def test_each_handlers_sample_request_is_answered(cls, model) -> None:
    """The sample `tsfleet up` sends to warm the serving path must be a request the model answers."""
    content_type, body = cls.sample_request()
    handler, ctx = load(cls, model, artifacts(model))
    [(status, answer)] = run(handler, ctx, [(body, content_type)])
    assert status == 200, answer
    assert "embedding" in answer or "intent" in answer or "label" in answer


def test_a_worker_that_does_not_compile_never_imports_torch_dynamo(embedder_dir) -> None:
    # torch._dynamo, once imported, adds ~70 MiB to every worker (218 -> 290 MiB here): only a
    # compiled model may touch it (minilm.mark_dynamic). In a process of its own: other tests
    # here compile.
    script = (
        "import sys, json; from pathlib import Path\n"
        "from tests.unit.test_handlers import load, run, TextEmbedder, IntentClassifier, artifacts\n"
        "for cls, model in ((TextEmbedder, 'text-embedder'), (IntentClassifier, 'intent-classifier')):\n"
        "    handler, ctx = load(cls, model, artifacts(model), warmup_batch_sizes=[1, 4])\n"
        "    out = run(handler, ctx, [({'text': 'hello there'}, 'application/json'),\n"
        "                             ({'text': 'a longer sentence than that'}, 'application/json')])\n"
        "    assert [status for status, _ in out] == [200, 200], out\n"
        "print(json.dumps('torch._dynamo' in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "false"



def test_text_batches_run_packed_on_cpu_and_padded_where_packing_does_not_pay(embedder_dir) -> None:
    from handlers.minilm import sentence_embeddings
    from handlers.text import TextItem

    handler, ctx = load(TextEmbedder, "text-embedder", embedder_dir)
    texts = ["Short.", "A somewhat longer sentence than the first one, with a clause.", "Mid length text."]
    assert handler.padded is False
    batch = handler.preprocess([TextItem([t], True) for t in texts])
    assert batch.mask is None and batch.ids.dim() == 1 and batch.lengths == [4, 15, 6]
    answers = run(handler, ctx, [(json.dumps({"text": t}).encode(), "application/json") for t in texts])
    with torch.inference_mode():
        padded = sentence_embeddings(handler.minilm.encoder, handler.minilm.batch(texts, 256, padded=True))
    for (code, body), want in zip(answers, padded.tolist()):
        assert code == 200 and max(abs(a - b) for a, b in zip(body["embedding"], want)) < 1e-5
    # Compiled (padded shapes compile once), or on any device but the CPU (a GPU: padding is
    # cheap there, a per-text loop is a kernel launch per text and layer): padded.
    handler.settings = dataclasses.replace(handler.settings, compile=True)
    assert handler.padded is True
    handler.settings = dataclasses.replace(handler.settings, compile=False)
    handler.device = torch.device("meta")
    assert handler.padded is True
