"""Shape drawing, image preprocessing, and the shape CNN trained by the repo's own code."""
from __future__ import annotations

import io
import random
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from handlers.shapes import (
    IMAGE_SIZE,
    LABELS,
    MEAN,
    STD,
    ShapeCNN,
    draw_shape,
    image_to_tensor,
    load_shape_cnn,
)
from tsfleet.build.training.shapes import make_dataset, save_shape_cnn, train_shape_cnn

EVAL_SEED = 20240611  # far from any training seed, so these shapes were never seen
N_EVAL = 150


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[ShapeCNN, list[str], Path]:
    started = time.perf_counter()
    obj = train_shape_cnn(seed=1)
    print(f"train_shape_cnn(seed=1): {time.perf_counter() - started:.1f}s")
    path = save_shape_cnn(obj, tmp_path_factory.mktemp("shapes") / "shape_cnn.pt")
    model, labels = load_shape_cnn(path)
    return model, labels, path


@pytest.fixture(scope="module")
def eval_shapes() -> tuple[list[Image.Image], list[str]]:
    rng = random.Random(EVAL_SEED)
    truth = [rng.choice(LABELS) for _ in range(N_EVAL)]
    return [draw_shape(label, rng) for label in truth], truth


def _accuracy(model: ShapeCNN, labels: list[str], images: list[Image.Image], truth: list[str]) -> float:
    with torch.no_grad():
        predicted = model(torch.stack([image_to_tensor(img) for img in images])).argmax(1).tolist()
    return sum(labels[p] == t for p, t in zip(predicted, truth)) / len(truth)


def _round_trip(img: Image.Image, fmt: str, **options) -> Image.Image:
    buf = io.BytesIO()
    img.resize((200, 150), Image.Resampling.BILINEAR).save(buf, fmt, **options)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.mark.parametrize(
    "img",
    [
        Image.new("RGBA", (64, 64), (10, 200, 30, 128)),
        Image.new("L", (64, 64), 77),
        Image.new("RGB", (64, 64), (1, 2, 3)).convert("P"),
        Image.new("CMYK", (64, 64), (0, 50, 100, 0)),
        Image.new("LA", (50, 80), (90, 255)),
        Image.new("I;16", (32, 32), 40000),
        Image.new("1", (64, 64), 1),
        Image.new("RGB", (1920, 1080), (200, 100, 0)),
        Image.new("RGB", (7, 5), (0, 100, 200)),
    ],
    ids=["RGBA", "L", "P", "CMYK", "LA", "I16", "1", "large", "small"],
)
def test_image_to_tensor_any_mode_and_size(img: Image.Image) -> None:
    x = image_to_tensor(img)
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def test_image_to_tensor_values() -> None:
    img = Image.new("RGB", (64, 64), (0, 0, 0))
    img.putpixel((5, 9), (255, 51, 102))
    x = image_to_tensor(img)
    for channel, value in enumerate((255, 51, 102)):
        assert x[channel, 9, 5].item() == pytest.approx((value / 255 - MEAN[channel]) / STD[channel])
    assert x[0, 0, 0].item() == pytest.approx(-MEAN[0] / STD[0])
    assert image_to_tensor(img, size=32).shape == (3, 32, 32)


def test_large_jpeg_is_decoded_small_but_looks_the_same() -> None:
    buf = io.BytesIO()
    draw_shape("square", random.Random(3), size=64).resize((2000, 1500)).save(buf, "JPEG", quality=90)
    drafted = image_to_tensor(Image.open(io.BytesIO(buf.getvalue())))
    full = Image.open(io.BytesIO(buf.getvalue()))
    full.load()
    assert drafted.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert (drafted - image_to_tensor(full)).abs().mean().item() < 0.05


def test_transparency_is_shown_on_white() -> None:
    clear = image_to_tensor(Image.new("RGBA", (64, 64), (0, 0, 0, 0)))
    white = image_to_tensor(Image.new("RGB", (64, 64), (255, 255, 255)))
    assert torch.equal(clear, white)


def test_draw_shape_is_deterministic_per_seed() -> None:
    for label in LABELS:
        a = draw_shape(label, random.Random(7))
        assert a.mode == "RGB" and a.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert a.tobytes() == draw_shape(label, random.Random(7)).tobytes()
        assert a.tobytes() != draw_shape(label, random.Random(8)).tobytes()
        assert len(a.getcolors(IMAGE_SIZE * IMAGE_SIZE)) > 2, "shape and background should both show"
    assert draw_shape("circle", random.Random(1), size=100).size == (100, 100)
    with pytest.raises(ValueError):
        draw_shape("hexagon", random.Random(0))


def test_make_dataset_is_balanced_and_deterministic() -> None:
    x, y = make_dataset(9, seed=5)
    assert x.shape == (9, 3, IMAGE_SIZE, IMAGE_SIZE) and y.tolist() == [0, 1, 2] * 3
    assert torch.equal(x, make_dataset(9, seed=5)[0])


def test_model_is_small(trained) -> None:
    model, labels, _ = trained
    assert labels == list(LABELS) and not model.training
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_classifies_fresh_shapes(trained, eval_shapes) -> None:
    model, labels, _ = trained
    images, truth = eval_shapes
    assert _accuracy(model, labels, images, truth) >= 0.95


@pytest.mark.parametrize(("fmt", "options"), [("PNG", {}), ("JPEG", {"quality": 85})])
def test_classifies_shapes_after_file_round_trip(trained, eval_shapes, fmt: str, options: dict) -> None:
    model, labels, _ = trained
    images, truth = eval_shapes
    files = [_round_trip(img, fmt, **options) for img in images]
    assert files[0].format == fmt and files[0].size == (200, 150)
    assert _accuracy(model, labels, files, truth) >= 0.90


def test_training_is_deterministic_per_seed(tmp_path: Path) -> None:
    # A short run shows the property; the full run is the fixture above.
    def run(seed: int, name: str) -> bytes:
        return save_shape_cnn(train_shape_cnn(seed, n_train=192, epochs=1), tmp_path / name).read_bytes()

    first = run(1, "a.pt")
    assert run(1, "b.pt") == first
    assert run(2, "c.pt") != first


def test_training_reports_progress_and_leaves_torch_state_alone() -> None:
    threads, rng_state = torch.get_num_threads(), torch.get_rng_state()
    lines: list[str] = []
    train_shape_cnn(0, n_train=128, epochs=2, progress=lines.append)
    assert [line.split(" loss ")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    assert " acc " in lines[-1]
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng_state)
