"""Loading the fleet's small trained models: ``{"state_dict", "labels", "config"}`` files."""
from __future__ import annotations

import os
from typing import Callable, TypeVar

import torch

M = TypeVar("M", bound=torch.nn.Module)


def load_labelled(path: str | os.PathLike[str], build: Callable[[dict], M], what: str,
                  device: str | torch.device = "cpu") -> tuple[M, list[str]]:
    """The model ``build(config)`` with the file's weights (eval mode, on ``device``) and its
    labels in logit order; ValueError naming the file when it is not such a checkpoint."""
    obj = torch.load(path, map_location=device, weights_only=True)
    if not isinstance(obj, dict) or not {"state_dict", "labels", "config"} <= obj.keys():
        raise ValueError(f"{path}: not {what} file (need state_dict, labels and config)")
    labels = [str(label) for label in obj["labels"]]
    model = build(obj["config"])
    n = model.config["n_labels"]  # type: ignore[index]
    if n != len(labels):
        raise ValueError(f"{path}: config says {n} labels, file lists {len(labels)}")
    model.load_state_dict(obj["state_dict"])
    return model.to(device).eval(), labels
