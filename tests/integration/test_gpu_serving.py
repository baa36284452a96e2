"""GPU tier, end to end: TorchServe's workers serve the fleet on the GPU with AMP, and a
worker's in-place replacement (handlers/handover.py) loads the successor beside the old
process, then gives the old process's GPU memory back. Skipped cleanly without CUDA."""
from __future__ import annotations

import threading

import pytest
import torch

from handlers.text_embedder import TextEmbedder
from tests.integration.test_handover_models import IMAGES, worker_pids
from tests.polling import wait_for
from tests.unit.test_handlers import artifacts, load, run
from tsfleet.manifest import Fleet
from tsfleet.control.recycle import Recycler, read_reports

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TEXTS = ["How do I reset my password?", "The volcano erupted and covered the village in ash.",
         "Where is my parcel?", "Cancel my subscription, please."]


def gpu_used_mb() -> float:
    """Memory in use on GPU 0 by every process (the workers are other processes)."""
    free, total = torch.cuda.mem_get_info(0)
    return (total - free) / 2**20


def test_every_model_version_serves_from_the_gpu(server, client, fleet: Fleet) -> None:
    for spec in fleet.versions():
        if spec.model == "image-classifier":
            resp = client.predict(spec.model, IMAGES[0], version=spec.version, content_type="image/png")
        else:
            resp = client.predict(spec.model, {"text": TEXTS[0]}, version=spec.version)
        assert resp.status_code == 200, (spec.model, spec.version, resp.text)

    def on_gpu(spec) -> bool:
        reports = read_reports(server.report_dir, spec.model, spec.version)
        return bool(reports) and all(r.cuda_mb > 0 for r in reports.values())

    for spec in fleet.versions():
        wait_for(f"{spec.model} {spec.version} reporting CUDA memory", lambda: on_gpu(spec), 30)


def test_gpu_embedding_under_amp_agrees_with_fp32_on_cpu(client) -> None:
    cpu, ctx = load(TextEmbedder, "text-embedder", artifacts("text-embedder"))
    want = torch.tensor([b["embedding"] for _, b in run(cpu, ctx, [({"text": t}, "application/json") for t in TEXTS])])
    answers = [client.predict("text-embedder", {"text": t}) for t in TEXTS]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    got = torch.tensor([a.json()["embedding"] for a in answers])
    assert torch.nn.functional.cosine_similarity(want, got).min() > 0.999


def test_replacement_loads_beside_the_old_process_then_frees_its_gpu_memory(server, client, fleet: Fleet) -> None:
    spec = next(s for s in fleet.versions() if s.model == "text-embedder" and s.version == "1.0")
    [slot] = worker_pids(server, "text-embedder")
    old = read_reports(server.report_dir, "text-embedder", "1.0")[slot].process
    expected = client.predict("text-embedder", {"text": TEXTS[1]}).json()["embedding"]
    before = gpu_used_mb()
    peak, done = [before], threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            peak.append(gpu_used_mb())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        event = Recycler(fleet, server.client, server.report_dir, progress=lambda line: None,
                         ready_timeout_s=240).replace(spec, slot, "test: replace on the GPU")
    finally:
        done.set()
        sampler.join()
    assert event.ok, event
    # The successor held a CUDA context and the model beside the old process...
    rise = max(peak) - before
    assert rise > 256, f"GPU use rose only {rise:.0f} MiB during the replacement"
    # ...and once it serves, the old process (now the slot's waiter) holds none.
    wait_for(f"GPU use falling back near {before:.0f} MiB (peak {max(peak):.0f} MiB)",
             lambda: gpu_used_mb() < before + rise / 2, 30)
    report = read_reports(server.report_dir, "text-embedder", "1.0")[slot]
    assert report.process != old
    again = client.predict("text-embedder", {"text": TEXTS[1]}).json()["embedding"]
    assert torch.nn.functional.cosine_similarity(torch.tensor([expected]), torch.tensor([again])).item() > 0.9999
    wait_for("the fresh process reporting CUDA memory",
             lambda: read_reports(server.report_dir, "text-embedder", "1.0")[slot].cuda_mb > 0, 30)
