"""Train the intent head (``handlers.intent_head.IntentHead``) on precomputed sentence embeddings.

The caller embeds the texts (all-MiniLM-L6-v2, L2-normalised); this module only fits the
small head, full-batch and deterministically, so one seed always gives the same file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from handlers.intent_head import IntentHead
from tsfleet.build.training import deterministic, save_checkpoint


def load_rows(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """``(text, intent)`` pairs from a JSON-lines file of ``{"text": ..., "intent": ...}``."""
    rows: list[tuple[str, str]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                text, intent = obj["text"], obj["intent"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected {{\"text\": ..., \"intent\": ...}}") from exc
            if not isinstance(text, str) or not isinstance(intent, str) or not text.strip() or not intent:
                raise ValueError(f"{path}:{lineno}: text and intent must be non-empty strings")
            rows.append((text, intent))
    return rows


def train_intent_head(
    embeddings: torch.Tensor,
    labels: Sequence[str],
    seed: int,
    epochs: int = 200,
    hidden_dim: int = 128,
    dropout: float = 0.1,
    lr: float = 3e-3,
    weight_decay: float = 1e-2,
    label_smoothing: float = 0.1,
    progress: Callable[[str], None] | None = None,
    progress_every: int = 20,
) -> dict[str, Any]:
    """Fit an ``IntentHead`` on ``embeddings [n, d]`` with one label per row.

    Returns ``{"state_dict", "labels", "config", "training"}``, the dict that
    ``handlers.intent_head.load_intent_head`` reads once saved; labels are sorted, so the
    logit order does not depend on the order of the rows. ``progress`` gets one line every
    ``progress_every`` epochs (full-batch epochs are tiny, so one per epoch is noise).
    """
    if embeddings.ndim != 2 or embeddings.shape[0] != len(labels) or len(labels) == 0:
        raise ValueError(
            f"need embeddings [n, d] and n labels, got {tuple(embeddings.shape)} and {len(labels)}"
        )
    names = sorted(set(labels))
    if len(names) < 2:
        raise ValueError("need at least two distinct labels")
    index = {name: i for i, name in enumerate(names)}
    # clone(): sentence-transformers returns inference-mode tensors, which autograd refuses.
    x = embeddings.detach().to("cpu", torch.float32).clone().contiguous()
    y = torch.tensor([index[label] for label in labels], dtype=torch.long)
    config = {"input_dim": x.shape[1], "hidden_dim": hidden_dim, "n_labels": len(names), "dropout": dropout}

    with deterministic(seed):
        model = IntentHead(config)
        optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        model.train()
        for epoch in range(1, epochs + 1):
            optimiser.zero_grad(set_to_none=True)
            logits = model(x)
            loss = loss_fn(logits, y)
            loss.backward()
            optimiser.step()
            if progress is not None and (epoch % progress_every == 0 or epoch == epochs):
                acc = (logits.argmax(1) == y).float().mean().item()
                progress(f"epoch {epoch}/{epochs} loss {loss.item():.4f} acc {acc:.3f}")
        model.eval()
        with torch.no_grad():
            train_acc = (model(x).argmax(1) == y).float().mean().item()

    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    return {
        "state_dict": state,
        "labels": names,
        "config": dict(model.config),
        "training": {"seed": seed, "epochs": epochs, "n_train": len(labels), "train_accuracy": train_acc},
    }


def save_intent_head(obj: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a ``train_intent_head`` result; equal results give byte-identical files."""
    return save_checkpoint(obj, path)
