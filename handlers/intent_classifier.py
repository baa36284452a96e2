"""intent-classifier: a small head over MiniLM sentence embeddings.

Request: ``{"text": "..."}`` / ``{"text": [...]}``, or embeddings from text-embedder
(``{"embedding": [...]}`` / ``{"embeddings": [[...], ...]}``), which is how the
intent-pipeline workflow feeds it.
Answer per text: ``{"intent": label, "confidence": p, "probabilities": {label: p}}``;
a list in gives ``{"predictions": [...]}``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from handlers.base import FleetHandler
from handlers.errors import BadInput, PayloadTooLarge
from handlers.intent_head import load_intent_head
from handlers.minilm import MiniLM, sentence_embeddings, warmup_texts
from handlers.payload import Payload
from handlers.text import TEXT_ACCEPTS, TextItem, read_texts

FIELDS = ("text", "embedding", "embeddings")
SAMPLE_TEXT = "book me a flight to Lisbon next week"


class IntentClassifier(FleetHandler):
    OPTIONS = {"max_texts": 64, "max_text_chars": 20000, "max_length": 256}
    ACCEPTS = TEXT_ACCEPTS

    def load(self, model_dir: Path) -> None:
        self.minilm = MiniLM.load(model_dir, self.device)
        self.head, self.labels = load_intent_head(model_dir / "intent_head.pt", self.device)
        self.model = self.minilm.encoder

    def decode(self, payload: Payload) -> TextItem:
        item, doc = read_texts(payload, self.options["max_texts"], self.options["max_text_chars"], FIELDS)
        if item is not None:
            return item
        if len(doc) != 1:
            raise BadInput("send exactly one of 'text', 'embedding' or 'embeddings'")
        single = "embedding" in doc
        vectors = [doc["embedding"]] if single else doc["embeddings"]
        return TextItem([], single, self._check_vectors(vectors))

    def _check_vectors(self, vectors: Any) -> list[list[float]]:
        dim = self.head.config["input_dim"]
        if not isinstance(vectors, list) or not vectors:
            raise BadInput("'embeddings' must be a non-empty list of vectors")
        if len(vectors) > self.options["max_texts"]:
            raise PayloadTooLarge(f"{len(vectors)} embeddings in one request; the limit is {self.options['max_texts']}")
        for vec in vectors:
            if not isinstance(vec, list) or len(vec) != dim:
                raise BadInput(f"an embedding must be a list of {dim} numbers")
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in vec):
                raise BadInput("an embedding must contain finite numbers only")
        return vectors

    def preprocess(self, items: list[TextItem]) -> dict[str, Any]:
        # Texts are encoded in one batch; given vectors join them after the forward
        # pass, and ``order`` puts every row back where its request had it.
        texts = [t for item in items for t in item.texts]
        vectors = [v for item in items for v in item.vectors]
        order, n_text, n_vec = [], 0, 0
        for item in items:
            for _ in range(item.inputs):
                if item.texts:
                    order.append(n_text)
                    n_text += 1
                else:
                    order.append(len(texts) + n_vec)
                    n_vec += 1
        batch: dict[str, Any] = {"order": torch.tensor(order, device=self.device), "texts": None, "vectors": None}
        if texts:  # packed, or padded for a compiled encoder (as text-embedder's)
            batch["texts"] = self.minilm.batch(texts, self.options["max_length"], padded=self.padded,
                                               compiled=self.compiled)
        if vectors:
            batch["vectors"] = torch.tensor(vectors, dtype=torch.float32, device=self.device)
        return batch

    def inference(self, batch: dict[str, Any]) -> torch.Tensor:
        parts = []
        if batch["texts"] is not None:
            parts.append(sentence_embeddings(self.model, batch["texts"]))
        if batch["vectors"] is not None:
            parts.append(batch["vectors"])
        embeddings = torch.cat(parts)[batch["order"]]
        return torch.softmax(self.head(embeddings).float(), dim=-1)

    def answer_row(self, probs: list[float]) -> dict[str, Any]:
        best = max(range(len(probs)), key=probs.__getitem__)
        return {"intent": self.labels[best], "confidence": probs[best],
                "probabilities": dict(zip(self.labels, probs))}

    @classmethod
    def sample_request(cls) -> tuple[str, bytes] | None:
        return "application/json", b'{"text": "%s"}' % SAMPLE_TEXT.encode()

    def warmup_items(self, batch_size: int) -> list[TextItem]:
        texts = warmup_texts(self.minilm.tokenizer, batch_size, SAMPLE_TEXT, self.options["max_length"])
        return [TextItem([text], True) for text in texts]
