"""A PredictionsRequest's model name and version, read without parsing (copying) its input.

protobuf's parser copies every field it reads, so parsing an image request to learn which
model it names copies the image. This walks the wire format instead: it reads the two
names, checks the rest as the parser would (lengths, UTF-8 of the string fields, the input
map's entries, unknown fields and groups skipped) and returns None where the parser would
fail, so a request is routed only if TorchServe can read it too.
"""
from __future__ import annotations

from typing import Callable

# PredictionsRequest: model_name = 1, model_version = 2, input = 3 (map<string, bytes>),
# sequence_id = 4; a map entry: key = 1 (string), value = 2 (bytes).
_REQUEST_STRINGS = {1, 2, 4}
_ENTRY_STRINGS = {1}


class _Corrupt(Exception):
    pass


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while shift < 64:
        if pos >= len(data):
            raise _Corrupt
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
    raise _Corrupt


def _fields(data: memoryview, pos: int, end: int, strings: set[int], on_field: Callable[[int, int, int], None],
            group: int = 0) -> int:
    """Walk the fields in ``data[pos:end]`` (or up to the end of ``group``); ``on_field(field,
    start, stop)`` gets each length-delimited one. Returns where the walk stopped."""
    while pos < end:
        tag, pos = _varint(data, pos)
        field, wire = tag >> 3, tag & 7
        if field == 0 or field >= 1 << 29:
            raise _Corrupt
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(data, pos)
            start, pos = pos, pos + size
            if pos > end:
                raise _Corrupt
            if field in strings:
                try:
                    str(data[start:pos], "utf-8")
                except UnicodeDecodeError:
                    raise _Corrupt from None
            on_field(field, start, pos)
        elif wire == 3:  # a group, unknown here: skipped to its end
            pos = _fields(data, pos, end, set(), lambda *_: None, group=field)
        elif wire == 4 and field == group:
            return pos
        else:
            raise _Corrupt
        if pos > end:
            raise _Corrupt
    if group:
        raise _Corrupt  # a group that never ends
    return pos


def request_names(payload: bytes | memoryview) -> tuple[str, str] | None:
    """(model_name, model_version) of a serialized PredictionsRequest; None if it does not parse."""
    data = memoryview(payload)
    names = {1: (0, 0), 2: (0, 0)}

    def entry_ok(start: int, stop: int) -> None:
        _fields(data, start, stop, _ENTRY_STRINGS, lambda *_: None)

    def on_field(field: int, start: int, stop: int) -> None:
        if field in names:
            names[field] = (start, stop)  # the last value of a field wins
        elif field == 3:
            entry_ok(start, stop)

    try:
        _fields(data, 0, len(data), _REQUEST_STRINGS, on_field)
    except _Corrupt:
        return None
    (a, b), (c, d) = names[1], names[2]
    return str(data[a:b], "utf-8"), str(data[c:d], "utf-8")
