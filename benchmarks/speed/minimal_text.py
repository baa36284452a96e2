"""A minimal hand-written TorchServe handler for MiniLM, no toolkit base class: what a
user writes from TorchServe's docs. Batching (8 / 5 ms, 2 workers x 1 thread) is tuned by
hand in the benchmark's manifest; answers are dicts that TorchServe serialises itself."""
import json
from typing import Any

import torch

from handlers.minilm import MiniLM, mean_pool_normalize


class MinimalTextEmbedder:
    def initialize(self, context: Any) -> None:
        torch.set_num_threads(1)
        self.model = MiniLM.load(context.system_properties["model_dir"])
        self.initialized = True

    def handle(self, data: list[dict], context: Any) -> list[dict]:
        texts = []
        for row in data:
            body = row.get("body") or row.get("data")
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body)
            texts.append(body["text"])
        ids, mask = self.model.tokenizer.encode_batch(texts, 256)
        with torch.inference_mode():
            emb = mean_pool_normalize(self.model.encoder(ids, mask), mask)
        return [{"embedding": row} for row in emb.tolist()]
