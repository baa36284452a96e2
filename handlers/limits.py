"""The input limits each model states once (its ACCEPTS, JSON_LIMITS and size OPTIONS), as the
table docs/input-limits.md shows: `python -m handlers.limits` prints it from the classes, and a
unit test fails when the doc drifts from them."""
from __future__ import annotations

from handlers.base import FleetHandler
from handlers.image_classifier import ImageClassifier
from handlers.intent_classifier import IntentClassifier
from handlers.text_embedder import TextEmbedder

MODELS: dict[str, type[FleetHandler]] = {
    "text-embedder": TextEmbedder, "intent-classifier": IntentClassifier, "image-classifier": ImageClassifier}

# Each size option a client can run into, the status past it, and what it counts.
SIZE_OPTIONS = {"max_texts": (413, "texts in one request"), "max_text_chars": (413, "characters in one text"),
                "max_pixels": (413, "pixels in one image (read from its header)"),
                "max_bytes": (413, "bytes of one image")}


def rows(name: str, cls: type[FleetHandler]) -> list[tuple[str, str, str]]:
    """(limit, value, status past it) for one model."""
    accepts = ", ".join(f"`{t}`" if t else "none" for t in cls.ACCEPTS)
    out = [("content type", accepts + (" (and `*/*+json`)" if "application/json" in cls.ACCEPTS else ""), "415"),
           ("JSON nesting", f"{cls.JSON_LIMITS.max_depth} levels", "400"),
           ("one JSON number", f"{cls.JSON_LIMITS.max_number_chars} characters", "400")]
    for key, (status, what) in SIZE_OPTIONS.items():
        if key in cls.OPTIONS:
            out.append((what, f"{cls.OPTIONS[key]:,}", str(status)))
    return out


def table() -> str:
    lines = ["| model | limit | value | past it |", "|---|---|---|---|"]
    for name, cls in MODELS.items():
        lines += [f"| {name} | {limit} | {value} | {status} |" for limit, value, status in rows(name, cls)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(table(), end="")
