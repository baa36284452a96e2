"""Turn one TorchServe request item into (value, content type), and decode JSON safely.

TorchServe hands a handler each request as a dict: a raw body under ``body`` or ``data``,
multipart fields under their own names, and JSON bodies already parsed when the worker
could parse them (raw bytes when it could not).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

from handlers.errors import BadRequest, UnsupportedMediaType

RAW_FIELDS = ("body", "data")


@dataclass(frozen=True)
class Payload:
    """One request's body and what the client said it is."""

    value: Any
    content_type: str
    field: str

    @property
    def media_type(self) -> str:
        return self.content_type.split(";", 1)[0].strip().lower()


def _content_type(headers: Mapping[str, Any], field: str) -> str:
    part = headers.get(field)
    if isinstance(part, Mapping) and part.get("content-type"):
        return str(part["content-type"])
    for key, value in headers.items():
        if isinstance(key, str) and key.lower() == "content-type" and isinstance(value, str):
            return value
    return ""


def extract(request: Mapping[str, Any], headers: Mapping[str, Any]) -> Payload:
    """The request's single body; a multipart form's first field when there is no raw body."""
    if not isinstance(request, Mapping) or not request:
        media = _content_type(headers, "body").split(";", 1)[0].strip().lower()
        if media in ("application/x-www-form-urlencoded", "multipart/form-data"):
            # TorchServe parses form bodies into fields; a JSON document sent by `curl -d`
            # without a Content-Type arrives here as an empty form.
            raise UnsupportedMediaType(
                f"content type {media!r} is not accepted; send the body with its real type,"
                " e.g. -H 'Content-Type: application/json'"
            )
        raise BadRequest("empty body")
    for field in RAW_FIELDS:
        if field in request and request[field] is not None:
            return Payload(request[field], _content_type(headers, field), field)
    field, value = next(iter(request.items()))
    return Payload(value, _content_type(headers, field), field)


def is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (bytes, bytearray, str)) and len(value) == 0)


def as_json(value: Any) -> Any:
    """Parsed JSON from a body that TorchServe may or may not have parsed already."""
    if isinstance(value, (dict, list)):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"body is not valid UTF-8 (byte {exc.start})") from None
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise BadRequest(f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    raise BadRequest(f"cannot read a JSON document from a {type(value).__name__}")


def as_text(value: Any) -> str:
    """A text/plain body as str, with a clear error for bytes that are not UTF-8."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRequest(f"body is not valid UTF-8 (byte {exc.start})") from None
    raise BadRequest(f"expected text, got {type(value).__name__}")
