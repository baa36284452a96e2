"""The speed suite's image requests (benchmarks/speed/workload.py): the model's own 64 x 64
PNGs by default, camera-like JPEGs at --image-px; the same bytes on every run, so runs compare."""
from __future__ import annotations

import io

from PIL import Image

from benchmarks.speed.workload import requests_text, shape_images, workload
from handlers.shapes import image_to_tensor


def test_default_images_are_the_model_s_own_pngs() -> None:
    images = shape_images()
    assert len(images) == 16 and all(Image.open(io.BytesIO(b)).format == "PNG" for b in images)
    assert workload("image-classifier").content_type == "image/png"


def test_larger_images_are_camera_sized_jpegs_the_handler_reads() -> None:
    images = shape_images(px=640)
    assert images == shape_images(px=640)  # fixed seeds, noise included
    assert len(set(images)) == 16
    for body in images:
        img = Image.open(io.BytesIO(body))
        assert (img.format, img.size) == ("JPEG", (640, 640))
    mean_kib = sum(map(len, images)) / 16 / 1024
    assert 100 < mean_kib < 300  # what a phone or webcam frame of this size weighs, not a flat drawing
    assert image_to_tensor(Image.open(io.BytesIO(images[0]))).shape == (3, 64, 64)
    w = workload("image-classifier", 640)
    assert w.content_type == "image/jpeg" and w.bodies == tuple(images)
    assert f"640 x 640, noisy as a camera's, {mean_kib:.0f} KiB on average" in requests_text(640)
