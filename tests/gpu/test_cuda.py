"""GPU tier: AMP, compile and CUDA memory cleanup on a real GPU. Skipped cleanly without CUDA."""
from __future__ import annotations

import pytest
import torch

from tests.unit.test_handlers import artifacts, load, run
from handlers.runtime import CudaCleanup
from handlers.text_embedder import TextEmbedder

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
TEXTS = [{"text": f"sentence {i}: the weather in Lisbon is lovely in spring"} for i in range(16)]


def _on_gpu(**settings):
    return load(TextEmbedder, "text-embedder", artifacts("text-embedder"), gpu_id=0, **settings)


@pytest.mark.parametrize("amp", ["off", "fp16", "bf16"])
def test_amp_on_cuda_agrees_with_fp32_cpu(amp) -> None:
    cpu, ctx_cpu = load(TextEmbedder, "text-embedder", artifacts("text-embedder"))
    gpu, ctx = _on_gpu(amp_cuda=amp)
    assert gpu.device.type == "cuda"
    reqs = [(t, "application/json") for t in TEXTS]
    want = torch.tensor([b["embedding"] for _, b in run(cpu, ctx_cpu, reqs)])
    got = torch.tensor([b["embedding"] for _, b in run(gpu, ctx, reqs)])
    assert torch.nn.functional.cosine_similarity(want, got).min() > (0.9999 if amp == "off" else 0.999)


def test_compile_on_cuda_matches_eager() -> None:
    eager, ectx = _on_gpu()
    compiled, cctx = _on_gpu(compile=True, warmup_batch_sizes=[1, 16])
    reqs = [(t, "application/json") for t in TEXTS]
    a = torch.tensor([b["embedding"] for _, b in run(eager, ectx, reqs)])
    b = torch.tensor([b["embedding"] for _, b in run(compiled, cctx, reqs)])
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.999


def test_cleanup_every_n_requests_frees_cached_memory() -> None:
    handler, ctx = _on_gpu(cuda_cleanup_every=16)
    reqs = [(t, "application/json") for t in TEXTS]
    run(handler, ctx, reqs)
    assert handler.cleanup.count == 1
    # The batch's activations were cached; the cleanup gave back all the cache could release.
    # What stays reserved beyond the allocations is free space inside segments that still hold
    # the weights, which no empty_cache releases.
    reserved = torch.cuda.memory_reserved()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() == reserved
    names = {name for name, _, _ in ctx.metrics.calls}
    assert {"HandlerCudaAllocatedMB", "HandlerCudaReservedMB", "HandlerCudaCleanups"} <= names


def test_cleanup_threshold_policy() -> None:
    device = torch.device("cuda:0")
    cleanup = CudaCleanup(device, every=0, threshold_mb=1)
    block = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    del block  # 64 MiB now cached but free: over the 1 MiB threshold
    assert cleanup.after(1) is True and cleanup.count == 1
