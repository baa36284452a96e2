"""Decoding of text requests shared by the text models.

Accepted: ``{"text": "..."}`` or ``{"text": ["...", ...]}`` as JSON, or a text/plain body.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from handlers.errors import BadInput, PayloadTooLarge
from handlers.payload import Payload, as_text, is_empty

# What the text models accept ("" is a body without a content type, as gRPC sends it).
TEXT_ACCEPTS = ("application/json", "text/plain", "")


@dataclass(frozen=True)
class TextItem:
    """The texts of one request; ``single`` remembers whether the client sent one string.

    A model that also accepts precomputed embeddings carries them in ``vectors`` instead.
    """

    texts: list[str]
    single: bool
    vectors: list[list[float]] = field(default_factory=list)

    @property
    def inputs(self) -> int:
        """How many rows of the model's output answer this item."""
        return len(self.texts) or len(self.vectors)


def check_texts(texts: Any, max_texts: int, max_chars: int) -> list[str]:
    """Validate a list of texts against the model's limits."""
    if not isinstance(texts, list) or not texts:
        raise BadInput("'text' must be a non-empty string or a non-empty list of strings")
    if len(texts) > max_texts:
        raise PayloadTooLarge(f"{len(texts)} texts in one request; the limit is {max_texts}")
    for i, text in enumerate(texts):
        where = "text" if len(texts) == 1 else f"text[{i}]"
        if not isinstance(text, str):
            raise BadInput(f"{where} must be a string, got {type(text).__name__}")
        if not text.strip():
            raise BadInput(f"{where} is empty")
        if len(text) > max_chars:
            raise PayloadTooLarge(f"{where} has {len(text)} characters; the limit is {max_chars}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                # JSON's \ud800 escape gives Python a lone surrogate, which is no character
                # a tokenizer (or any UTF-8 consumer downstream) can take.
                raise BadInput(f"{where} holds a lone surrogate at character {exc.start}, which is not"
                                 " valid Unicode") from None
    return texts


def read_document(payload: Payload) -> Any:
    """The JSON document of a request, or the raw string of a text/plain one."""
    if is_empty(payload.value):
        raise BadInput("empty body; send JSON like {\"text\": \"...\"}")
    # The base handler has refused any media type but TEXT_ACCEPTS (and +json) already.
    if payload.media_type == "text/plain":
        return as_text(payload.value)
    return payload.json()


def read_texts(payload: Payload, max_texts: int, max_chars: int, allowed: tuple[str, ...] = ("text",)) -> tuple[TextItem | None, dict]:
    """Return the request's texts, or (None, document) when it carries another allowed field."""
    doc = read_document(payload)
    if isinstance(doc, str):
        return TextItem(check_texts([doc], max_texts, max_chars), True), {}
    if not isinstance(doc, dict):
        raise BadInput(f"expected a JSON object like {{\"text\": \"...\"}}, got a JSON {type(doc).__name__}")
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise BadInput(f"unknown field(s) {', '.join(map(repr, unknown))}; expected {' or '.join(map(repr, allowed))}")
    if "text" not in doc:
        if len(doc) == 0:
            raise BadInput(f"missing field {' or '.join(map(repr, allowed))}")
        return None, doc
    value = doc["text"]
    single = isinstance(value, str)
    return TextItem(check_texts([value] if single else value, max_texts, max_chars), single), doc
