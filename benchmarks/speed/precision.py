"""What less precision buys on this CPU, and what it costs the answers:
``python -m benchmarks.speed.precision`` (docs/benchmarks-precision.md).

The peer comparison's bars ask tsfleet to lead the best peer by more than the model alone can
at fp32 on a small CPU (docs/benchmarks-peers.md, "The most any server could lead by here"):
only less work per request could. This measures the candidates on the model alone, in
process, one torch thread, batches of 8 of the speed suite's requests, in windows that rotate
between the variants (so the machine's drift falls on all alike):

- ``fp32``: eager, the reference every other variant is compared with;
- ``compile``: ``torch.compile`` (inductor), fp32;
- ``bf16``: bf16 autocast, eager (emulated, and slower, on a CPU without AVX512-BF16 or AMX);
- ``int8``: dynamic int8 quantization of the Linear layers, per-channel weights (text only:
  the image CNN's work is in its convolutions).

Each variant's answers to the whole request set are compared with fp32's: the largest absolute
difference, the smallest cosine similarity of an answer row with its reference (1.0: the same
direction), and how often the top label is the same.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from benchmarks.speed.workload import ROOT, Pipeline, workload

VARIANTS = ("fp32", "compile", "bf16", "int8")
# Within this an embedding keeps its neighbours: the bound a default precision must hold.
MIN_COSINE = 0.9999
# ...and no value of an answer further than this from fp32's (measured: 1.5e-3 for MiniLM).
BF16_MAX_DEVIATION = 5e-3
BATCH = 8


def _model_and_inputs(pipeline: Pipeline, bodies: list[bytes]) -> tuple[Any, Callable[[Any, Any], Any], list[Any]]:
    """(the module to vary, how a batch runs through it to answer rows, the batches of inputs)."""
    import torch

    if pipeline.model_name == "text-embedder":
        from handlers.minilm import mean_pool_normalize

        tokenizer = pipeline.minilm.tokenizer
        texts = [json.loads(b)["text"] for b in bodies]
        batches = [tokenizer.encode_batch(texts[i:i + BATCH], 256) for i in range(0, len(texts), BATCH)]
        return pipeline.minilm.encoder, lambda m, b: mean_pool_normalize(m(*b).float(), b[1]), batches
    import io

    from PIL import Image

    from handlers.shapes import IMAGE_SIZE, image_to_tensor

    x = [image_to_tensor(Image.open(io.BytesIO(b)), IMAGE_SIZE) for b in bodies]
    batches = [torch.stack(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]
    return pipeline.cnn, lambda m, b: torch.softmax(m(b).float(), dim=-1), batches


def make_variant(name: str, module: Any, model: str) -> Callable[[Callable[[Any, Any], Any], Any], Any] | None:
    """A callable ``(forward, batch) -> rows`` for variant ``name``; None where it does not apply."""
    import torch

    if name == "fp32":
        return lambda forward, batch: forward(module, batch)
    if name == "compile":
        compiled = torch.compile(module, dynamic=True)
        return lambda forward, batch: forward(compiled, batch)
    if name == "bf16":
        def bf16(forward: Callable[[Any, Any], Any], batch: Any) -> Any:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return forward(module, batch)
        return bf16
    if name == "int8":
        if model != "text-embedder":
            return None
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantized = quantize_dynamic(copy.deepcopy(module), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                     dtype=torch.qint8)
        return lambda forward, batch: forward(quantized, batch)
    raise ValueError(f"unknown variant {name!r} (known: {', '.join(VARIANTS)})")


def accuracy(rows: Any, reference: Any, labels: bool) -> dict[str, float | None]:
    """How far ``rows`` are from ``reference`` (both [n, d] tensors); ``labels``: the rows are
    class scores, whose top label should stay the same."""
    import torch

    cosine = torch.nn.functional.cosine_similarity(rows, reference, dim=-1)
    top1 = float((rows.argmax(-1) == reference.argmax(-1)).float().mean()) if labels else None
    return {"max_abs_deviation": float((rows - reference).abs().max()), "min_cosine": float(cosine.min()),
            "top1_agreement": top1}


def measure_model(model: str, names: list[str], seconds: float, runs: int, log: Callable[[str], None]) -> dict:
    """Items/s and accuracy of each variant in ``names`` for ``model``."""
    import torch

    torch.set_num_threads(1)
    w = workload(model)
    module, forward, batches = _model_and_inputs(Pipeline(w), w.items)
    module.eval()
    out: dict[str, Any] = {"batch": BATCH, "items_in_set": sum(len(b[0]) if isinstance(b, tuple) else len(b)
                                                               for b in batches), "variants": {}}
    runners = {}
    with torch.inference_mode():
        reference = torch.cat([forward(module, b) for b in batches])
        for name in names:
            run = make_variant(name, module, model)
            if run is None:
                out["variants"][name] = {"applies": False}
                continue
            started = time.perf_counter()
            rows = torch.cat([run(forward, b) for b in batches])  # compiles every shape before timing
            out["variants"][name] = {"applies": True, "first_pass_s": round(time.perf_counter() - started, 2),
                                     **accuracy(rows, reference, model != "text-embedder")}
            runners[name] = run
        rates: dict[str, list[float]] = {name: [] for name in runners}
        for _ in range(runs):
            for name, run in runners.items():  # rotating windows: drift falls on every variant
                done, start = 0, time.perf_counter()
                while time.perf_counter() - start < seconds:
                    for b in batches:
                        run(forward, b)
                        done += len(b[0]) if isinstance(b, tuple) else len(b)
                rates[name].append(done / (time.perf_counter() - start))
    base = statistics.median(rates["fp32"]) if rates.get("fp32") else None
    for name, values in rates.items():
        figure = statistics.median(values)
        out["variants"][name].update(items_per_s=round(figure, 1), spread=round(max(values) - min(values), 1),
                                     x_fp32=round(figure / base, 2) if base else None)
        v = out["variants"][name]
        log(f"  {model:<16} {name:<8} {figure:8.1f} items/s  x fp32 {v['x_fp32']}  "
            f"max |diff| {v['max_abs_deviation']:.2e}  min cosine {v['min_cosine']:.4f}")
    return out


def markdown(doc: dict) -> str:
    meta = doc["meta"]
    lines = ["# Less precision on this CPU: what it buys, what it costs the answers", "",
             f"Written by `python -m benchmarks.speed.precision` on {meta['date']}: {meta['cpu_model']}, "
             f"bf16 in hardware: {'yes' if meta['native_bf16'] else 'no'}, torch {meta['torch']}. The model alone, "
             f"in process, one torch thread, batches of {BATCH} of the speed suite's requests, "
             f"{meta['runs']} windows of {meta['seconds']:g} s per variant, rotating; each figure the median. "
             "Accuracy over the whole request set against fp32 eager.", "",
             "| model | variant | items/s | ± | x fp32 | max abs deviation | min cosine | top-1 agreement | "
             "first pass s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for model, entry in doc["models"].items():
        for name, v in entry["variants"].items():
            if not v.get("applies"):
                lines.append(f"| {model} | {name} | does not apply | | | | | | |")
                continue
            lines.append(f"| {model} | {name} | {v['items_per_s']:.1f} | {v['spread']:.1f} | {v['x_fp32']:.2f} | "
                         f"{v['max_abs_deviation']:.2e} | {v['min_cosine']:.6f} | "
                         f"{'' if v['top1_agreement'] is None else format(v['top1_agreement'], '.3f')} | "
                         f"{v['first_pass_s']:.1f} |")
    lines += ["", f"A variant is a candidate for the fleet's defaults only within the bound: a minimum cosine of "
              f"{MIN_COSINE} for an embedding, the same top label for a classifier. What a candidate buys once "
              "served (TorchServe's frontend and worker protocol stay as they are) is docs/benchmarks-peers.md's to "
              "say; `compile` and `amp_cpu` are handler settings in fleet.yaml (docs/manifest.md).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed.precision", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["text-embedder", "image-classifier"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT, help="write docs/ and benchmarks/results/ under here")
    args = parser.parse_args(argv)
    import platform

    import torch

    from benchmarks.speed.fleets import ensure_artifacts
    from handlers.runtime import cpu_has_native_bf16

    if "fp32" not in args.variants:
        parser.error("fp32 is the reference: keep it among --variants")
    ensure_artifacts(args.models)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    doc = {"meta": {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu_model": cpu, "native_bf16": cpu_has_native_bf16(),
                    "torch": torch.__version__, "seconds": args.seconds, "runs": args.runs}, "models": {}}
    for model in args.models:
        doc["models"][model] = measure_model(model, args.variants, args.seconds, args.runs, print)
    (args.out / "docs").mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (args.out / "benchmarks" / "results" / "precision.json").write_text(json.dumps(doc, indent=1) + "\n")
    (args.out / "docs" / "benchmarks-precision.md").write_text(markdown(doc))
    print(f"wrote {args.out / 'docs' / 'benchmarks-precision.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
