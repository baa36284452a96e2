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
from typing import Any

from benchmarks.speed.loadgen import AnswerCheck

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


def camera_jpeg(label: str, rng: random.Random, px: int) -> bytes:
    """A ``px`` x ``px`` JPEG (quality 90) of ``label`` with sensor-like noise, all from
    ``rng``: the size a real image client sends (about 40 KiB at 320, 165 KiB at 640, 420
    KiB at 1024), where a flat drawing would compress to a few KiB."""
    from PIL import Image

    from handlers.shapes import draw_shape

    img = draw_shape(label, rng, px)
    noise = Image.frombytes("RGB", (px, px), rng.randbytes(px * px * 3))
    buf = io.BytesIO()
    Image.blend(img, noise, 0.2).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def shape_images(count: int = 16, px: int = 64) -> list[bytes]:
    """``count`` images of the image model's shapes, drawn from fixed seeds: at the model's
    own size (64), PNGs of a few hundred bytes; larger, camera-like JPEGs (camera_jpeg)."""
    from handlers.shapes import IMAGE_SIZE, LABELS, draw_shape

    out = []
    for i in range(count):
        rng, label = random.Random(1000 + i), LABELS[i % len(LABELS)]
        if px != IMAGE_SIZE:
            out.append(camera_jpeg(label, rng, px))
            continue
        buf = io.BytesIO()
        draw_shape(label, rng, px).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def text_workload() -> Workload:
    bodies = tuple(json.dumps({"text": s}).encode() for s in sentences())
    return Workload("text-embedder", "sentences", "application/json", bodies, ARTIFACTS / "text-embedder-1.0")


def image_workload(px: int = 64) -> Workload:
    return Workload("image-classifier", "images", "image/png" if px == 64 else "image/jpeg",
                    tuple(shape_images(px=px)), ARTIFACTS / "image-classifier-1.0")


def requests_text(image_px: int) -> str:
    """The reports' sentence on what was sent."""
    images = ("16 PNGs of the model's shapes (64 x 64, ~0.3 KiB)" if image_px == 64 else
              f"16 JPEGs of the model's shapes ({image_px} x {image_px}, noisy as a camera's, "
              f"{sum(map(len, shape_images(px=image_px))) / 16 / 1024:.0f} KiB on average; the handler scales them "
              "to 64 x 64)")
    return ("Requests: text-embedder gets the 50 short sentences of `data/intents/heldout.jsonl` (6-12 words, one "
            f"per request); image-classifier {images} drawn from fixed seeds, as raw bodies.")


WORKLOADS = {"text-embedder": text_workload, "image-classifier": image_workload}


def workload(model: str, image_px: int = 64) -> Workload:
    """The request set of ``model`` (``image_px``: the images' side, see shape_images)."""
    if model == "image-classifier":
        return image_workload(image_px)
    return WORKLOADS[model]()


def _is_embedding(body: bytes) -> bool:
    try:
        row = json.loads(body)["embedding"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(row, list) and len(row) == 384


def _is_top_k(body: bytes) -> bool:
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and "label" in answer and len(answer.get("top_k") or ()) == 3


# Every 200 of every system must be the model's answer: an embedding's 384 floats are 383
# commas and nothing else in the body has one; an image's answer names 4 labels (its own and
# the top 3).
ANSWER_CHECKS = {
    "text-embedder": AnswerCheck('body:find(\'"embedding"\', 1, true) and select(2, body:gsub(",", "")) == 383',
                                 _is_embedding),
    "image-classifier": AnswerCheck('select(2, body:gsub(\'"label"\', "")) == 4', _is_top_k),
}


def answer_check(model: str) -> AnswerCheck:
    """What every answer of ``model`` must look like under load."""
    return ANSWER_CHECKS[model]


def deviation(answer: dict[str, Any], reference: dict[str, Any]) -> float:
    """Largest absolute difference between two answers (embedding components, or class
    scores by label; a different top label counts as 1.0)."""
    if "embedding" in reference:
        got = answer.get("embedding") or []
        if len(got) != len(reference["embedding"]):
            return float("inf")
        return max(abs(a - b) for a, b in zip(got, reference["embedding"]))
    if answer.get("label") != reference["label"]:
        return 1.0
    mine = {t["label"]: t["score"] for t in answer.get("top_k", [])}
    return max(abs(mine.get(t["label"], 0.0) - t["score"]) for t in reference["top_k"])


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

            self.cnn, self.labels = load_shape_cnn(workload.artifacts / "shape_cnn.pt")

    def answers(self, bodies: list[bytes]) -> list[dict[str, Any]]:
        """The model's answer to each body, as the fleet's handlers answer (the reference
        every server's answers are compared with)."""
        rows = self(bodies)
        if self.model_name == "text-embedder":
            return [{"embedding": row} for row in rows]
        out = []
        for row in rows:
            top = sorted(((score, self.labels[i]) for i, score in enumerate(row)), reverse=True)[:3]
            out.append({"label": top[0][1], "score": top[0][0],
                        "top_k": [{"label": label, "score": score} for score, label in top]})
        return out

    def __call__(self, bodies: list[bytes]) -> list[list[float]]:
        torch = self.torch
        with torch.inference_mode():
            if self.model_name == "text-embedder":
                from handlers.minilm import sentence_embeddings

                # The handlers' own forward: the texts packed, no compute on padding.
                texts = [json.loads(b)["text"] for b in bodies]
                return sentence_embeddings(self.minilm.encoder, self.minilm.batch(texts, 256)).tolist()
            else:
                from PIL import Image

                from handlers.shapes import IMAGE_SIZE, image_to_tensor

                x = torch.stack([image_to_tensor(Image.open(io.BytesIO(b)), IMAGE_SIZE) for b in bodies])
                return torch.softmax(self.cnn(x), dim=-1).tolist()
