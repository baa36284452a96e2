"""HTTP/2's wire format (RFC 9113) as the router uses it: frame types, flags, error codes,
settings, and the encoding of a frame (http2.py: the connection that reads and writes them)."""
from __future__ import annotations

import struct

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x2, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x6, 0x7, 0x8, 0x9, 0xB
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE = 0x4, 0x5
DEFAULT_WINDOW, DEFAULT_FRAME = 65535, 16384

# What the router lets a peer send: big frames and windows, so a whole image request
# arrives in a few frames without waiting for a WINDOW_UPDATE.
RECV_FRAME = 1 << 20
RECV_STREAM_WINDOW = 1 << 24
RECV_CONN_WINDOW = 1 << 26
HEAD = struct.Struct(">IBI")  # length << 8 | type, flags, stream
LARGE = 4096  # DATA payloads over this are handed on as views of the bytes read, not copies
# What ``send`` takes as a stream's data: bytes, or pieces sent in turn (a large message
# made of a view of what a client sent and a few bytes around it, never joined).
Data = bytes | memoryview | list[bytes | memoryview]


def streamed(ftype: int, flags: int, length: int) -> bool:
    """Whether a frame not yet whole is passed on as it comes: a large, unpadded DATA frame."""
    return ftype == DATA and length > LARGE and not flags & PADDED


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return HEAD.pack(len(payload) << 8 | ftype, flags, stream) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in settings.items()))


class ProtocolError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
