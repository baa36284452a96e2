"""Synthetic shapes and the small CNN that tells circles, squares and triangles apart.

``draw_shape`` makes the training images; ``image_to_tensor`` is the one preprocessing path
used for training and serving alike, so a client's PNG or JPEG is seen exactly as the
training images were. Serving-side code: torch, Pillow and the standard library only.
"""
from __future__ import annotations

import math
import os
import random
from typing import Any, Mapping, Sequence

import torch
from PIL import Image, ImageDraw, ImageOps
from torch import nn

from handlers.checkpoint import load_labelled

LABELS = ("circle", "square", "triangle")
IMAGE_SIZE = 64
# Fixed, not fitted: random colours make the data's own statistics close to these anyway.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

DEFAULT_CONFIG: dict[str, Any] = {
    "channels": [16, 32, 64],
    "n_labels": len(LABELS),
    "image_size": IMAGE_SIZE,
}

_SUPERSAMPLE = 4
_MIN_RADIUS, _MAX_RADIUS = 0.14, 0.42  # circumradius, as a fraction of the canvas side
_MIN_LUMA_GAP = 70  # of 255: keeps the shape visible even in greyscale
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "PA"})


def _luma(rgb: Sequence[int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    while True:
        bg = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        fg = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if abs(_luma(bg) - _luma(fg)) >= _MIN_LUMA_GAP:
            return bg, fg


def _polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> list[tuple[float, float]]:
    turns = [angle + 2 * math.pi * k / sides for k in range(sides)]
    return [(cx + radius * math.cos(t), cy + radius * math.sin(t)) for t in turns]


def draw_shape(label: str, rng: random.Random, size: int = IMAGE_SIZE) -> Image.Image:
    """An RGB ``size`` x ``size`` image of one filled ``label`` shape; all randomness from ``rng``.

    Size, position, colours and (for squares and triangles) rotation are random; the shape
    always lies wholly inside the canvas.
    """
    if label not in LABELS:
        raise ValueError(f"unknown shape {label!r}; expected one of {LABELS}")
    bg, fg = _colours(rng)
    radius = rng.uniform(_MIN_RADIUS, _MAX_RADIUS) * size
    cx = rng.uniform(radius + 1, size - radius - 1)
    cy = rng.uniform(radius + 1, size - radius - 1)
    angle = rng.uniform(0, 2 * math.pi)

    # Drawn large and box-filtered down: PIL's polygons have no anti-aliasing, and jagged
    # edges would be a cue that real (smooth, resampled) images do not have.
    s = _SUPERSAMPLE
    canvas = Image.new("RGB", (size * s, size * s), bg)
    draw = ImageDraw.Draw(canvas)
    if label == "circle":
        draw.ellipse([(cx - radius) * s, (cy - radius) * s, (cx + radius) * s, (cy + radius) * s], fill=fg)
    else:
        sides = 4 if label == "square" else 3
        draw.polygon([(x * s, y * s) for x, y in _polygon(cx, cy, radius, sides, angle)], fill=fg)
    return canvas.resize((size, size), Image.Resampling.BOX)


def _to_rgb(img: Image.Image, size: int) -> Image.Image:
    if img.format == "JPEG":
        # Let libjpeg decode a big photo at 1/2..1/8 scale (never below ``size``): far
        # cheaper than decoding every pixel only to throw most away in the resize. A no-op
        # once the image is loaded.
        img.draft("RGB", (size, size))
    try:
        img = ImageOps.exif_transpose(img)  # phone photos store their rotation in EXIF
    except Exception:  # a broken EXIF block should not make the image unreadable
        pass
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("I", "F") or img.mode.startswith("I;"):
        # convert("L") clips high-bit-depth greyscale; rescale 16-bit and [0, 1] float data.
        img = img.convert("F")
        hi = img.getextrema()[1]
        scale = 255.0 / 65535.0 if hi > 255 else 255.0 if hi <= 1.0 else 1.0
        img = img.point(lambda v: v * scale).convert("L")
    if img.mode in _ALPHA_MODES:
        # Transparent pixels carry arbitrary colour; show them on white, as a viewer would.
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


def image_to_tensor(img: Image.Image, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Any PIL image as a normalised float tensor ``[3, size, size]`` (RGB, bilinear resize).

    A JPEG that is not loaded yet is decoded at reduced scale (``Image.draft``), in place.
    """
    rgb = _to_rgb(img, size)
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    # bytearray: frombuffer over immutable bytes warns and would alias read-only memory.
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    x = pixels.view(size, size, 3).permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


class ShapeCNN(nn.Module):
    """Conv-BN-ReLU-MaxPool blocks, then global max pooling and a linear classifier."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        cfg = {**DEFAULT_CONFIG, **(config or {})}
        self.config: dict[str, Any] = {
            "channels": [int(c) for c in cfg["channels"]],
            "n_labels": int(cfg["n_labels"]),
            "image_size": int(cfg["image_size"]),
        }
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in self.config["channels"]:
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        # Max, not average: "is there a corner anywhere" is the question, and averaging
        # dilutes a small shape's few corner activations into the background (it trains
        # far slower here).
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(c_in, self.config["n_labels"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, n_labels]`` for normalised images ``[batch, 3, H, W]``."""
        return self.classifier(self.pool(self.features(images)).flatten(1))


def load_shape_cnn(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[ShapeCNN, list[str]]:
    """The CNN (in eval mode, on ``device``) and its labels in logit order."""
    return load_labelled(path, ShapeCNN, "a shape CNN", device)
