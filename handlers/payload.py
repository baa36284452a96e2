"""Turn one TorchServe request item into a Payload, and read JSON from it within limits.

TorchServe hands a handler each request as a dict: a raw body under ``body`` or ``data``,
multipart fields under their own names. With ``decode_input_request=false`` (what tsfleet's
config.properties sets) bodies arrive as the client's bytes and are parsed here, once, within
the model's limits; a TorchServe left at its default parses JSON itself first, and what it
parsed is held to the same limits.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from handlers.errors import BadInput, UnsupportedMediaType

RAW_FIELDS = ("body", "data")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


@dataclass(frozen=True)
class JsonLimits:
    """How deeply nested, and how long a number, a JSON body may hold."""

    max_depth: int = 8  # arrays and objects inside each other
    max_number_chars: int = 40  # characters of one number as sent (digits, sign, exponent)


@dataclass(frozen=True)
class Payload:
    """One request's body, what the client said it is, and the JSON limits of its model."""

    value: Any
    content_type: str
    field: str
    limits: JsonLimits = field(default_factory=JsonLimits)

    @property
    def media_type(self) -> str:
        return self.content_type.split(";", 1)[0].strip().lower()

    def json(self) -> Any:
        """The body as a JSON document within ``limits``, or a BadInput naming what is wrong."""
        return as_json(self.value, self.limits)


def _content_type(headers: Mapping[str, Any], field: str) -> str:
    part = headers.get(field)
    if isinstance(part, Mapping) and part.get("content-type"):
        return str(part["content-type"])
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == "content-type" and isinstance(value, str):
            return value
    return ""


def extract(request: Mapping[str, Any], headers: Mapping[str, Any], limits: JsonLimits | None = None) -> Payload:
    """The request's single body; a multipart form's first field when there is no raw body."""
    limits = limits or JsonLimits()
    if not isinstance(request, Mapping) or not request:
        media = _content_type(headers, "body").split(";", 1)[0].strip().lower()
        if media in FORM_TYPES:
            # TorchServe parses form bodies into fields; a JSON document sent by `curl -d`
            # without a Content-Type arrives here as an empty form.
            raise UnsupportedMediaType(
                f"content type {media!r} is not accepted; send the body with its real type,"
                " e.g. -H 'Content-Type: application/json'"
            )
        raise BadInput("empty body")
    for name in RAW_FIELDS:
        if name in request and request[name] is not None:
            return Payload(request[name], _content_type(headers, name), name, limits)
    name, value = next(iter(request.items()))
    return Payload(value, _content_type(headers, name), str(name), limits)


def is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (bytes, bytearray, str)) and len(value) == 0)


OUT_OF_RANGE = "a number in the JSON is out of range (JSON has no NaN or Infinity)"
_CONTAINERS = (dict, list)


def _number(kind: type, limits: JsonLimits) -> Any:
    def parse(text: str) -> Any:
        if len(text) > limits.max_number_chars:
            raise BadInput(f"a number in the JSON has {len(text)} characters; the limit is {limits.max_number_chars}")
        number = kind(text)
        if kind is float and not math.isfinite(number):  # 1e999
            raise BadInput(OUT_OF_RANGE)
        return number
    return parse


def _no_constant(name: str) -> Any:
    raise BadInput(f"{name} is not a JSON value")


def _check_depth(doc: Any, limits: JsonLimits) -> Any:
    """``doc`` unchanged when it nests no deeper than ``limits`` allow: level by level, looking
    at containers only (its numbers were checked as they were parsed). A whole walk cost as
    much again as the parse on 64 embeddings (7.5 ms over 9.4)."""
    level = [doc] if isinstance(doc, _CONTAINERS) else []
    depth = 0
    while level:
        depth += 1
        if depth > limits.max_depth:
            raise BadInput(f"JSON nested deeper than {limits.max_depth} levels")
        below: list[Any] = []
        for node in level:
            below += [c for c in (node.values() if isinstance(node, dict) else node) if c.__class__ in _CONTAINERS]
        level = below
    return doc


def check_shape(doc: Any, limits: JsonLimits) -> Any:
    """``doc`` unchanged when its nesting and numbers are within ``limits`` (no recursion:
    the document may be as deep as a parser let through). For a document TorchServe parsed."""
    too_big = 10 ** limits.max_number_chars
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limits.max_depth:
                raise BadInput(f"JSON nested deeper than {limits.max_depth} levels")
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
        elif isinstance(node, float) and not math.isfinite(node):
            raise BadInput(OUT_OF_RANGE)
        elif isinstance(node, int) and not isinstance(node, bool) and abs(node) >= too_big:
            raise BadInput(f"a number in the JSON has more than {limits.max_number_chars} digits")
    return doc


def as_json(value: Any, limits: JsonLimits | None = None) -> Any:
    """Parsed JSON from a body that TorchServe may or may not have parsed already."""
    limits = limits or JsonLimits()
    if isinstance(value, (dict, list)):
        return check_shape(value, limits)
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(f"body is not valid UTF-8 (byte {exc.start})") from None
    if isinstance(value, str):
        try:
            doc = json.loads(value, parse_int=_number(int, limits), parse_float=_number(float, limits),
                             parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise BadInput(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
        except RecursionError:
            # The parser gives up near a thousand levels: far past the limit either way.
            raise BadInput(f"JSON nested deeper than {limits.max_depth} levels") from None
        return _check_depth(doc, limits)
    raise BadInput(f"cannot read a JSON document from a {type(value).__name__}")


def as_text(value: Any) -> str:
    """A text/plain body as str, with a clear error for bytes that are not UTF-8."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadInput(f"body is not valid UTF-8 (byte {exc.start})") from None
    raise BadInput(f"expected text, got {type(value).__name__}")
