"""Intent classifier head over 384-d, L2-normalised all-MiniLM-L6-v2 sentence embeddings.

The head is trained at build time by ``tsfleet.build.training.intents`` and saved with
``torch.save`` as ``{"state_dict": ..., "labels": [...], "config": {...}}``.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from handlers.checkpoint import load_labelled

DEFAULT_CONFIG: dict[str, Any] = {"input_dim": 384, "hidden_dim": 128, "n_labels": 5, "dropout": 0.1}


class IntentHead(nn.Module):
    """Linear -> GELU -> Dropout -> Linear; ``hidden_dim`` 0 makes it a single linear layer."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        cfg = {**DEFAULT_CONFIG, **(config or {})}
        self.config: dict[str, Any] = {
            "input_dim": int(cfg["input_dim"]),
            "hidden_dim": int(cfg["hidden_dim"]),
            "n_labels": int(cfg["n_labels"]),
            "dropout": float(cfg["dropout"]),
        }
        c = self.config
        if c["hidden_dim"] > 0:
            self.net: nn.Module = nn.Sequential(
                nn.Linear(c["input_dim"], c["hidden_dim"]),
                nn.GELU(),
                nn.Dropout(c["dropout"]),
                nn.Linear(c["hidden_dim"], c["n_labels"]),
            )
        else:
            self.net = nn.Sequential(nn.Dropout(c["dropout"]), nn.Linear(c["input_dim"], c["n_labels"]))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, n_labels]`` for embeddings ``[batch, input_dim]``."""
        return self.net(embeddings)


def load_intent_head(
    path: str | os.PathLike[str], device: str | torch.device = "cpu"
) -> tuple[IntentHead, list[str]]:
    """The head (in eval mode, on ``device``) and its labels in logit order."""
    return load_labelled(path, IntentHead, "an intent head", device)
