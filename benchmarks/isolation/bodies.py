"""Hostile request bodies that once failed (or could fail) a whole batch, and the well-formed
requests sent beside them.

Each entry is one found case: the isolation benchmark (``python -m benchmarks.isolation``)
sends it under load and counts batch-mates that failed, and the property tier
(tests/integration/test_isolation_property.py) replays every entry as a regression example
before it generates new ones.
"""
from __future__ import annotations

import io
import random
import struct
import zlib
from dataclasses import dataclass

from PIL import Image

from handlers.shapes import draw_shape

TEXT, INTENT, IMAGE = "text-embedder", "intent-classifier", "image-classifier"
JSON, PLAIN, FORM = "application/json", "text/plain", "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Hostile:
    """One bad body: the model it is sent to, its content type ("" for none) and bytes."""

    name: str
    model: str
    content_type: str
    body: bytes
    note: str

    @property
    def over_grpc(self) -> bool:
        """gRPC carries no content type (the model reads the bytes as if sent with none): a
        body whose point is its content type, a form, is REST only."""
        return self.content_type != FORM


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge image (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncated_png() -> bytes:
    """The first half of a noisy 128 x 128 PNG."""
    data = png(Image.effect_noise((128, 128), 64).convert("RGB"))
    return data[: len(data) // 2]


def _deep(opening: bytes, closing: bytes, levels: int, inner: bytes = b"") -> bytes:
    return opening * levels + inner + closing * levels


HOSTILE: tuple[Hostile, ...] = (
    Hostile("deep-list", TEXT, JSON, b'{"text": ' + _deep(b"[", b"]", 1000) + b"}",
            "1,000 nested lists: RecursionError in the handler's json.loads"),
    Hostile("huge-number", TEXT, JSON, b'{"text": ' + b"9" * 100_000 + b"}",
            "a 100,000-digit number: ValueError past Python's int-digits limit"),
    Hostile("deep-object", TEXT, JSON, _deep(b'{"a": ', b"}", 1000, b"1"),
            "1,000 nested objects"),
    Hostile("huge-ints-as-embedding", INTENT, JSON, b'{"embedding": [' + b",".join([b"7" * 4000] * 384) + b"]}",
            "384 numbers of 4,000 digits: OverflowError in the finite-number check"),
    Hostile("nan-embedding", INTENT, JSON, b'{"embedding": [' + b",".join([b"NaN"] * 384) + b"]}",
            "NaN, which Python's JSON reads and JSON has not"),
    Hostile("lone-surrogate", TEXT, JSON, b'{"text": "\\ud800 and more"}',
            "a lone surrogate escape: no character a tokenizer can take"),
    Hostile("not-utf8", TEXT, PLAIN, b"\xff\xfe\xfd", "bytes that are not UTF-8"),
    Hostile("png-without-type", TEXT, "", png(Image.new("RGB", (8, 8))), "an image with no content type to a text model"),
    Hostile("form-to-image", IMAGE, FORM, png(Image.new("RGB", (8, 8))),
            "a PNG sent as a form (TorchServe parses it into fields)"),
    Hostile("truncated-png", IMAGE, "image/png", truncated_png(), "half a PNG"),
    Hostile("decompression-bomb", IMAGE, "image/png", png_header_only(20000, 20000),
            "a 100-byte PNG declaring 20000 x 20000 pixels"),
)

# Well-formed requests and the answer each must get, whatever is batched with it.
SENTENCES = (("please cancel my subscription", "cancel"), ("what will the weather be like tomorrow", "weather"),
             ("book a train to Vienna", "travel"))
SHAPES = ("circle", "square", "triangle")


def good_requests(model: str, n: int = 3) -> list[tuple[str, bytes, str]]:
    """``n`` well-formed (content type, body, expected label) for ``model``; for
    text-embedder the label is the sentence (its embedding is compared to one taken alone)."""
    if model == IMAGE:
        rng = random.Random(11)
        return [("image/png", png(draw_shape(SHAPES[i % 3], rng)), SHAPES[i % 3]) for i in range(n)]
    return [(JSON, b'{"text": "%s"}' % SENTENCES[i % 3][0].encode(),
             SENTENCES[i % 3][1] if model == INTENT else SENTENCES[i % 3][0]) for i in range(n)]
