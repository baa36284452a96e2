"""Fixed request sets and the in-process pipelines of the two benchmarked models.

Every scenario sends the same bodies in the same order, so rows of one run differ only in
what serves them.
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "build" / "artifacts"


@dataclass(frozen=True)
class Workload:
    """One benchmarked model: its name in the fleet, request bodies and their content type."""

    model: str
    unit: str
    content_type: str
    bodies: tuple[bytes, ...]
    artifacts: Path

    @property
    def items(self) -> list[bytes]:
        return list(self.bodies)


def sentences() -> list[str]:
    """Short sentences (6-12 words) from the repo's held-out intent data, in file order."""
    rows = (ROOT / "data" / "intents" / "heldout.jsonl").read_text().splitlines()
    return [json.loads(row)["text"] for row in rows if row.strip()]


def shape_pngs(count: int = 16) -> list[bytes]:
    """``count`` PNGs of the image model's shapes, drawn from fixed seeds."""
    from handlers.shapes import IMAGE_SIZE, LABELS, draw_shape

    out = []
    for i in range(count):
        img = draw_shape(LABELS[i % len(LABELS)], random.Random(1000 + i), IMAGE_SIZE)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def text_workload() -> Workload:
    bodies = tuple(json.dumps({"text": s}).encode() for s in sentences())
    return Workload("text-embedder", "sentences", "application/json", bodies, ARTIFACTS / "text-embedder-1.0")


def image_workload() -> Workload:
    return Workload("image-classifier", "images", "image/png", tuple(shape_pngs()),
                    ARTIFACTS / "image-classifier-1.0")


WORKLOADS = {"text-embedder": text_workload, "image-classifier": image_workload}


class Pipeline:
    """The model's own work for a batch of request bodies, in process: decode, tokenize or
    resize, forward pass, pooling or softmax. No server, no JSON answers."""

    def __init__(self, workload: Workload):
        import torch

        self.torch = torch
        self.model_name = workload.model
        if workload.model == "text-embedder":
            from handlers.minilm import MiniLM

            self.minilm = MiniLM.load(workload.artifacts)
        else:
            from handlers.shapes import load_shape_cnn

            self.cnn, _ = load_shape_cnn(workload.artifacts / "shape_cnn.pt")

    def __call__(self, bodies: list[bytes]) -> None:
        torch = self.torch
        with torch.inference_mode():
            if self.model_name == "text-embedder":
                from handlers.minilm import mean_pool_normalize

                texts = [json.loads(b)["text"] for b in bodies]
                ids, mask = self.minilm.tokenizer.encode_batch(texts, 256)
                mean_pool_normalize(self.minilm.encoder(ids, mask), mask).tolist()
            else:
                from PIL import Image

                from handlers.shapes import IMAGE_SIZE, image_to_tensor

                x = torch.stack([image_to_tensor(Image.open(io.BytesIO(b)), IMAGE_SIZE) for b in bodies])
                torch.softmax(self.cnn(x), dim=-1).tolist()
