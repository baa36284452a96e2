"""Train ``handlers.shapes.ShapeCNN`` on synthetic circles, squares and triangles.

Everything (data, initialisation, batch order) follows from one seed, and training runs on a
fixed number of threads with deterministic kernels, so one seed always gives the same file.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from handlers.shapes import IMAGE_SIZE, LABELS, ShapeCNN, draw_shape, image_to_tensor
from tsfleet.build.training import deterministic, save_checkpoint


def make_dataset(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` shapes as ``(images [n, 3, size, size], label indices [n])``, classes balanced."""
    rng = random.Random(seed)
    images = torch.empty(n, 3, size, size, dtype=torch.float32)
    targets = torch.empty(n, dtype=torch.long)
    for i in range(n):
        # Cycling the labels keeps the classes balanced to within one image for any n.
        label_index = i % len(LABELS)
        images[i] = image_to_tensor(draw_shape(LABELS[label_index], rng, size), size)
        targets[i] = label_index
    return images, targets


def train_shape_cnn(
    seed: int,
    n_train: int = 3000,
    epochs: int = 6,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    threads: int = 2,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Draw ``n_train`` shapes from ``seed`` and fit a ``ShapeCNN`` on them.

    Returns ``{"state_dict", "labels", "config", "training"}``, the dict that
    ``handlers.shapes.load_shape_cnn`` reads once saved. ``threads`` is part of the recipe:
    the same seed on a different thread count may round differently. ``progress`` gets one
    line per epoch, e.g. ``"epoch 3/8 loss 0.1234 acc 0.970"``.
    """
    if n_train < batch_size or epochs < 1:
        raise ValueError("need n_train >= batch_size and at least one epoch")
    images, targets = make_dataset(n_train, seed)
    steps_per_epoch = n_train // batch_size  # the ragged last batch is dropped: BN dislikes tiny batches

    with deterministic(seed, threads):
        model = ShapeCNN({"n_labels": len(LABELS), "image_size": IMAGE_SIZE})
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        # One-cycle warm-up then anneal: reaches high accuracy in few epochs from scratch.
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=lr, epochs=epochs, steps_per_epoch=steps_per_epoch
        )
        loss_fn = nn.CrossEntropyLoss()
        order_rng = torch.Generator().manual_seed(seed)
        model.train()
        for epoch in range(1, epochs + 1):
            order = torch.randperm(n_train, generator=order_rng)
            total_loss, correct, seen = 0.0, 0, 0
            for step in range(steps_per_epoch):
                idx = order[step * batch_size : (step + 1) * batch_size]
                x, y = images[idx], targets[idx]
                optimiser.zero_grad(set_to_none=True)
                logits = model(x)
                loss = loss_fn(logits, y)
                loss.backward()
                optimiser.step()
                schedule.step()
                total_loss += loss.item() * len(y)
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
            if progress is not None:
                progress(f"epoch {epoch}/{epochs} loss {total_loss / seen:.4f} acc {correct / seen:.3f}")
        model.eval()

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return {
        "state_dict": state,
        "labels": list(LABELS),
        "config": dict(model.config),
        # Wall time is left out on purpose: it would make equal models differ byte-wise.
        "training": {"seed": seed, "n_train": n_train, "epochs": epochs, "batch_size": batch_size,
                     "threads": threads, "train_accuracy": correct / seen},
    }


def save_shape_cnn(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a ``train_shape_cnn`` result; equal results give byte-identical files."""
    return save_checkpoint(obj, path)
