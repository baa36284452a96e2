"""image-classifier: a small CNN that tells circles, squares and triangles apart.

Request: a PNG or JPEG body (raw, or a multipart file field), or ``{"image": "<base64>"}``.
Answer: ``{"label": "circle", "score": 0.99, "top_k": [{"label": ..., "score": ...}, ...]}``.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from handlers.base import FleetHandler
from handlers.image import IMAGE_ACCEPTS, read_image
from handlers.payload import Payload
from handlers.shapes import IMAGE_SIZE, image_to_tensor, load_shape_cnn


class ImageClassifier(FleetHandler):
    OPTIONS = {"top_k": 3, "max_pixels": 4096 * 4096, "max_bytes": 8 * 2**20}
    ACCEPTS = IMAGE_ACCEPTS

    def load(self, model_dir: Path) -> None:
        self.model, self.labels = load_shape_cnn(model_dir / "shape_cnn.pt", self.device)

    def decode(self, payload: Payload) -> Image.Image:
        return read_image(payload, self.options["max_pixels"], self.options["max_bytes"])

    def preprocess(self, items: list[Image.Image]) -> torch.Tensor:
        return torch.stack([image_to_tensor(img, IMAGE_SIZE) for img in items]).to(self.device)

    def inference(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(batch).float(), dim=-1)

    def answer_row(self, probs: list[float]) -> dict[str, Any]:
        k = max(1, min(self.options["top_k"], len(self.labels)))
        best = sorted(range(len(probs)), key=lambda i: -probs[i])[:k]
        top = [{"label": self.labels[i], "score": probs[i]} for i in best]
        return {"label": top[0]["label"], "score": top[0]["score"], "top_k": top}

    @classmethod
    def sample_request(cls) -> tuple[str, bytes] | None:
        png = io.BytesIO()
        Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128)).save(png, format="PNG")
        return "image/png", png.getvalue()

    def warmup_items(self, batch_size: int) -> list[Image.Image]:
        return [Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (128, 128, 128))] * batch_size
