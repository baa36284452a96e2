"""Whether two answers agree: the shadow's and the primary's."""
from __future__ import annotations

import json
import math
from typing import Any

FLOAT_TOLERANCE = 1e-3
# A classifier's answer agrees when its decision does, whatever its probabilities.
DECISION_FIELDS = ("label", "intent")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=0, abs_tol=FLOAT_TOLERANCE)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def answers_agree(a: bytes, b: bytes) -> bool:
    """Same decision (label/intent) when both have one; else equal as JSON with floats within
    1e-3; else byte for byte."""
    try:
        doc_a, doc_b = json.loads(a), json.loads(b)
    except (ValueError, UnicodeDecodeError):
        return a == b
    if isinstance(doc_a, dict) and isinstance(doc_b, dict):
        for key in DECISION_FIELDS:
            if key in doc_a and key in doc_b:
                return doc_a[key] == doc_b[key]
    return _same(doc_a, doc_b)
