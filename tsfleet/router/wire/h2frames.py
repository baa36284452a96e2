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
STREAM_CLOSED = 0x5
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6
DEFAULT_WINDOW, DEFAULT_FRAME = 65535, 16384
MAX_WINDOW, MAX_FRAME = 2**31 - 1, 2**24 - 1
_NAMES = ("DATA", "HEADERS", "PRIORITY", "RST_STREAM", "SETTINGS", "PUSH_PROMISE", "PING", "GOAWAY",
          "WINDOW_UPDATE", "CONTINUATION")
_CONNECTION_ONLY = frozenset({SETTINGS, PING, GOAWAY})
_STREAM_ONLY = frozenset({DATA, HEADERS, PRIORITY, RST_STREAM, PUSH_PROMISE, CONTINUATION})
_FIXED_LENGTH = {PRIORITY: 5, RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4}

# What the router lets a peer send: big frames and windows, so a whole image request
# arrives in a few frames without waiting for a WINDOW_UPDATE.
RECV_FRAME = 1 << 20
RECV_STREAM_WINDOW = 1 << 24
RECV_CONN_WINDOW = 1 << 26
# One header list, decoded, and one header block as sent (HEADERS and its CONTINUATIONs): gRPC
# metadata is a few hundred bytes; without a cap a CONTINUATION flood was buffered whole.
RECV_HEADER_LIST = 64 * 1024
RECV_CONCURRENT_STREAMS = 1000
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
    """A connection error: the connection is closed with a GOAWAY carrying ``code``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def check_frame(ftype: int, flags: int, stream: int, payload: bytes | memoryview) -> None:
    """RFC 9113's rules for a whole frame of a known type, before anything reads it: the
    stream it may be on, its length, its padding. Unknown types pass (they are ignored)."""
    if ftype <= HEADERS:  # DATA and HEADERS, most frames by far: their checks alone
        if not stream:
            raise ProtocolError(PROTOCOL_ERROR, f"{_NAMES[ftype]} on stream 0")
        if flags & (PADDED | PRIORITY_FLAG):
            _check_padding(ftype, flags, payload)
        return
    if ftype >= len(_NAMES):
        return
    name, n = _NAMES[ftype], len(payload)
    if ftype == PUSH_PROMISE:  # a client cannot push (8.4), and the router's SETTINGS say ENABLE_PUSH 0 (6.6)
        raise ProtocolError(PROTOCOL_ERROR, f"PUSH_PROMISE on stream {stream}: pushes are not taken")
    if stream and ftype in _CONNECTION_ONLY:
        raise ProtocolError(PROTOCOL_ERROR, f"{name} on stream {stream}")
    if not stream and ftype in _STREAM_ONLY:
        raise ProtocolError(PROTOCOL_ERROR, f"{name} on stream 0")
    want = _FIXED_LENGTH.get(ftype)
    if want is not None and n != want:
        raise ProtocolError(FRAME_SIZE_ERROR, f"{name} of {n} bytes, not {want}")
    if ftype == SETTINGS and (n % 6 or (flags & ACK and n)):
        raise ProtocolError(FRAME_SIZE_ERROR, f"SETTINGS of {n} bytes")
    if ftype == GOAWAY and n < 8:
        raise ProtocolError(FRAME_SIZE_ERROR, f"GOAWAY of {n} bytes")


def _check_padding(ftype: int, flags: int, payload: bytes | memoryview) -> None:
    n = len(payload)
    if flags & PADDED:
        if n == 0 or payload[0] >= n:
            raise ProtocolError(PROTOCOL_ERROR, f"{_NAMES[ftype]} padding of {payload[0] if n else '?'} in {n} bytes")
        n -= payload[0] + 1
    if ftype == HEADERS and flags & PRIORITY_FLAG and n < 5:
        raise ProtocolError(FRAME_SIZE_ERROR, f"HEADERS with PRIORITY in {n} bytes")


def check_stream(conn, ftype: int, flags: int, stream: int) -> None:
    """RFC 9113 5.1's rules for a frame on a stream in the state it is in, for ``conn`` (an
    http2.Http2Connection): called for HEADERS, RST_STREAM, WINDOW_UPDATE on a stream not
    open, and DATA on a stream not open to DATA (not for DATA on an open one: the hot path).

    idle (not opened yet): only HEADERS may come, and only on the peer's own ids (5.1.1);
    half-closed (remote), a stream of the peer's it ended: only RST_STREAM and WINDOW_UPDATE
    (STREAM_CLOSED, a connection error as 5.4.1 allows: a dispatcher would see a call end
    twice); open: a second HEADERS must end the stream (trailers, 8.1). Closed streams take
    anything, ignored (5.1: frames the peer sent before it saw the stream end). A new stream
    of the peer's is recorded here (``conn.peer_high``)."""
    if conn.continuing is not None:  # DATA in a header block (other frames: http2.py's own check)
        raise ProtocolError(PROTOCOL_ERROR, "header block interrupted")
    if not stream:  # DATA on stream 0, before its flow control (6.1)
        raise ProtocolError(PROTOCOL_ERROR, f"{_NAMES[ftype]} on stream 0")
    peers = stream & 1 != conn.client_side  # opened by the peer: odd ones, for a server
    if stream not in conn.windows and stream > (conn.peer_high if peers else conn.own_high):
        if ftype != HEADERS or not peers:
            raise ProtocolError(PROTOCOL_ERROR, f"{_NAMES[ftype]} on idle stream {stream}")
        conn.peer_high = stream
        return
    if not peers or ftype == RST_STREAM or ftype == WINDOW_UPDATE:
        return
    if stream in conn.stream_unacked:  # open: HEADERS now are trailers
        if ftype == HEADERS and not flags & END_STREAM:
            raise ProtocolError(PROTOCOL_ERROR, f"HEADERS without END_STREAM on open stream {stream}")
    elif stream in conn.windows:  # half-closed (remote)
        raise ProtocolError(STREAM_CLOSED, f"{_NAMES[ftype]} on stream {stream} after its END_STREAM")


def check_setting(key: int, value: int) -> None:
    """RFC 9113 6.5.2's range for each setting the router reads."""
    if key == S_ENABLE_PUSH and value > 1:
        raise ProtocolError(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
    if key == S_INITIAL_WINDOW_SIZE and value > MAX_WINDOW:
        raise ProtocolError(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE {value}")
    if key == S_MAX_FRAME_SIZE and not DEFAULT_FRAME <= value <= MAX_FRAME:
        # 0 was taken once: a frame splitter that cuts nothing off loops forever.
        raise ProtocolError(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")


# Control frames a peer may send per second before its connection is closed with
# ENHANCE_YOUR_CALM: each costs the router work (an answer, a cancelled upstream call) and
# none carries a request. Far above what gRPC clients send (keepalive and BDP pings).
FLOOD_BUDGET = {RST_STREAM: 500, PING: 1000, SETTINGS: 100}


class Floods:
    """Counts one connection's control frames per type over one-second windows, against
    ``budget`` (FLOOD_BUDGET's types; a client-facing connection's come from router.limits);
    ``tripped``: the type that went over, once one has."""

    __slots__ = ("since", "spent", "budget", "tripped")

    def __init__(self, budget: dict[int, int] = FLOOD_BUDGET) -> None:
        self.since, self.spent, self.budget, self.tripped = 0.0, dict.fromkeys(budget, 0), budget, None

    def spend(self, ftype: int, now: float) -> None:
        if now - self.since >= 1.0:
            self.since, self.spent = now, dict.fromkeys(self.budget, 0)
        self.spent[ftype] += 1
        if self.spent[ftype] > self.budget[ftype]:
            self.tripped = ftype
            raise ProtocolError(ENHANCE_YOUR_CALM, f"more than {self.budget[ftype]} {_NAMES[ftype]} frames a second")
