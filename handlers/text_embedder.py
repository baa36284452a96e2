"""text-embedder: all-MiniLM-L6-v2 sentence embeddings (384 floats, L2-normalised).

Request: ``{"text": "..."}`` or ``{"text": ["...", ...]}``.
Answer: ``{"embedding": [...]}`` for one text, ``{"embeddings": [[...], ...]}`` for a list.
"""
from __future__ import annotations

from pathlib import Path

import torch

from handlers.base import FleetHandler
from handlers.minilm import MiniLM, TokenBatch, sentence_embeddings, warmup_texts
from handlers.payload import Payload
from handlers.text import TEXT_ACCEPTS, TextItem, read_texts

WARMUP_TEXT = "A short warm-up sentence of typical length for this model."


class TextEmbedder(FleetHandler):
    OPTIONS = {"max_texts": 64, "max_text_chars": 20000, "max_length": 256}
    ACCEPTS = TEXT_ACCEPTS
    ONE_KEY, MANY_KEY = "embedding", "embeddings"

    def load(self, model_dir: Path) -> None:
        self.minilm = MiniLM.load(model_dir, self.device)
        self.model = self.minilm.encoder

    def decode(self, payload: Payload) -> TextItem:
        item, _ = read_texts(payload, self.options["max_texts"], self.options["max_text_chars"])
        assert item is not None
        return item

    def preprocess(self, items: list[TextItem]) -> TokenBatch:
        texts = [text for item in items for text in item.texts]
        return self.minilm.batch(texts, self.options["max_length"], padded=self.padded, compiled=self.compiled)

    def inference(self, batch: TokenBatch) -> torch.Tensor:
        return sentence_embeddings(self.model, batch)

    @classmethod
    def sample_request(cls) -> tuple[str, bytes] | None:
        return "application/json", b'{"text": "%s"}' % WARMUP_TEXT.encode()

    def warmup_items(self, batch_size: int) -> list[TextItem]:
        # With compile on, a batch of one and one of several (padded) compile the encoder's
        # two graphs at load, both with dynamic shapes (mark_dynamic): no client pays for it.
        texts = warmup_texts(self.minilm.tokenizer, batch_size, WARMUP_TEXT, self.options["max_length"])
        return [TextItem([text], True) for text in texts]
