"""h2 (python-hyper) as the oracle for the router's HTTP/2 server side.

Hypothesis writes sequences of client frames after the preface, well formed (serialized by
hyperframe) and not (packed by hand), and the same bytes go, one frame at a time, to an h2
server connection and to the router's ``GrpcServerConnection``. Each side's verdict is the
first frame that ends the connection (h2: ``receive_data`` raises its ``ProtocolError``; the
router: it closes the transport) and the code of the GOAWAY it writes, read back with
hyperframe; or none. The verdicts must agree, except where ``ALLOWED`` says why they may
not; no exception may escape the router's ``data_received``.

Both sides are given the same limits: small ones, so that flow control, stream caps, header
list sizes and the router's flood budgets are all reached within a few frames.
"""
from __future__ import annotations

import asyncio
import os
import struct
from typing import Callable, NamedTuple
from unittest import mock

import hpack
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived
from h2.exceptions import ProtocolError as H2ProtocolError
from h2.settings import SettingCodes, Settings
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame,
                              PriorityFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame)

from tests.wire import Wire
from tsfleet.router.wire import h2frames as f
from tsfleet.router.wire.grpc_wire import GrpcServerConnection

FRAME, CONN_WINDOW = 16384, 65535  # HTTP/2's defaults: what h2 starts with
STREAM_WINDOW = 8192  # below FRAME: one DATA frame can overrun it
HEADER_LIST = 1024  # decoded; the router also caps a block as sent at 4 times this
STREAMS = 7
FLOODS = {f.RST_STREAM: 3, f.PING: 4, f.SETTINGS: 3}  # the router's budgets, made small

LONG = os.environ.get("TSFLEET_HYPOTHESIS_PROFILE") == "long"
settings.register_profile("h2-oracle", max_examples=5000 if LONG else 300, derandomize=not LONG, deadline=None,
                          print_blob=True, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ the two sides
class Verdict(NamedTuple):
    at: int | None  # the frame (index in the sequence) that ended the connection; None: it stands
    code: int | None  # the GOAWAY's error code


class Dispatcher:
    """Takes calls and never answers them: every stream stays as the client left it."""

    stopping = False

    def opened(self, conn, call) -> None:
        pass

    def ended(self, conn, call) -> None:
        pass


class Router(GrpcServerConnection):
    frame_in, stream_window_in, conn_window_in = FRAME, STREAM_WINDOW, CONN_WINDOW
    header_list_in, streams_in = HEADER_LIST, STREAMS


def goaway_code(written: bytes) -> int | None:
    """The error code of the GOAWAY among the frames a side wrote (each must parse)."""
    pos = 0
    while pos < len(written):
        frame, length = Frame.parse_frame_header(memoryview(written[pos:pos + 9]))
        frame.parse_body(memoryview(written[pos + 9:pos + 9 + length]))
        if isinstance(frame, GoAwayFrame):
            return frame.error_code
        pos += 9 + length
    return None


def router_verdict(frames: list[bytes], cut: int = 0) -> Verdict:
    """Frames given one read each; or (``cut``) all of them in reads of ``cut`` bytes, as a
    socket may cut them (a large DATA frame is then passed on as it comes: another path)."""
    reads = frames if not cut else [b"".join(frames)[i:i + cut] for i in range(0, sum(map(len, frames)), cut)]

    async def main() -> Verdict:
        conn, wire = Router(Dispatcher(), set()), Wire()
        conn.connection_made(wire)  # type: ignore[arg-type]
        conn.data_received(f.PREFACE)
        with mock.patch.dict(f.FLOOD_BUDGET, FLOODS):
            for i, data in enumerate(reads):
                conn.data_received(data)  # nothing may escape it
                if wire.closed:
                    return Verdict(i, goaway_code(bytes(wire.written)))
        conn._flush()
        assert goaway_code(bytes(wire.written)) is None
        return Verdict(None, None)

    return asyncio.run(main())


def h2_verdict(frames: list[bytes]) -> Verdict:
    conn = H2Connection(H2Configuration(client_side=False, validate_inbound_headers=False))
    conn.local_settings = Settings(client=False, initial_values={
        SettingCodes.ENABLE_PUSH: 0, SettingCodes.MAX_CONCURRENT_STREAMS: STREAMS,
        SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW, SettingCodes.MAX_FRAME_SIZE: FRAME,
        SettingCodes.MAX_HEADER_LIST_SIZE: HEADER_LIST})
    conn.decoder.max_header_list_size = HEADER_LIST
    conn.initiate_connection()
    conn.receive_data(f.PREFACE)
    for i, data in enumerate(frames):
        try:
            events = conn.receive_data(data)
        except H2ProtocolError:  # a connection error: h2 has written its GOAWAY
            return Verdict(i, goaway_code(conn.data_to_send()))
        for event in events:  # credited as soon as read, as the router does
            if isinstance(event, DataReceived) and event.flow_controlled_length:
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
    return Verdict(None, None)


# ------------------------------------------------------------------ frames
def raw(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    """A frame as hyperframe would refuse to write it."""
    return struct.pack(">IBI", len(payload) << 8 | ftype, flags, stream) + payload


def head(data: bytes) -> tuple[int, int, int, bytes]:
    """(type, flags, stream, payload) of a frame's bytes."""
    length_type, flags, stream = struct.unpack(">IBI", data[:9])
    return length_type & 0xFF, flags, stream & 0x7FFFFFFF, data[9:]


def one_in(n: int) -> st.SearchStrategy[bool]:
    """True about once in ``n`` (not at either bound, which Hypothesis draws more often)."""
    return st.integers(0, n + 1).map(lambda k: k == n // 2 + 1)


REQUEST = [(":method", "POST"), (":scheme", "http"),
           (":path", "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Ping"),
           (":authority", "router"), ("content-type", "application/grpc"), ("te", "trailers")]
BAD_BLOCKS = [
    b"\x80",  # indexed field 0 (RFC 7541 6.1)
    b"\xff\x49",  # indexed field 200: past both tables
    b"\xbe",  # index 62: the dynamic table's first entry, empty unless a block added one
    b"\x40\x05ab",  # a literal whose name runs past the block
    b"\x3f\xe2\x1f",  # a table size update to 4097, over the 4096 agreed
    b"\x82\x3f\xe1\x1f",  # a table size update after a field (RFC 7541 4.2)
    b"\x82\xff\xff\xff\xff\xff\xff\x7f",  # an integer past 2^32
    b"\x00\x81\xff\x01a",  # a Huffman name that is all padding (RFC 7541 5.2)
    b"\x00\x01a\x01\xff",  # a value of one byte that is not UTF-8 (legal: HPACK carries bytes)
]


@st.composite
def blocks(draw, hostile: bool) -> bytes:
    kind = draw(st.sampled_from(["big", "bad", "random"])) if hostile else "request"
    if kind in ("request", "big"):
        extra = [("x-big", "v" * draw(st.integers(900, 1100)))] if kind == "big" else []
        return hpack.Encoder().encode(REQUEST + extra, huffman=draw(st.booleans()))
    return draw(st.sampled_from(BAD_BLOCKS)) if kind == "bad" else draw(st.binary(max_size=24))


@st.composite
def settings_frames(draw, stream: int, hostile: bool) -> list[bytes]:
    key = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 8, 0, 7, 0xFFFF]))
    value = draw(st.one_of(st.sampled_from([0, 1, 2, 16383, 16384, 2**24 - 1, 2**24, 2**31 - 1, 2**31, 2**32 - 1]),
                           st.integers(0, 2**32 - 1)))
    payload = struct.pack(">HI", key, value)
    if not hostile:  # a setting's value may still be out of range
        ack = draw(st.booleans())
        return [SettingsFrame(flags=["ACK"] * ack, settings={} if ack else {key: value}).serialize()]
    shape = draw(st.sampled_from(["ack+payload", "ragged", "on a stream"]))
    if shape == "ack+payload":
        return [raw(f.SETTINGS, f.ACK, 0, payload)]
    if shape == "ragged":
        return [raw(f.SETTINGS, 0, 0, payload + bytes(draw(st.integers(1, 5))))]
    return [raw(f.SETTINGS, 0, stream or 1, payload)]


@st.composite
def window_updates(draw, stream: int, hostile: bool) -> list[bytes]:
    stream = draw(st.sampled_from([0, stream]))
    increment = draw(st.sampled_from([1, 100, STREAM_WINDOW, CONN_WINDOW, 2**31 - 1 - CONN_WINDOW]) if not hostile
                     else st.sampled_from([0, 2**31 - 1, 2**31, 2**32 - 1]))
    if not hostile:
        return [WindowUpdateFrame(stream, window_increment=increment).serialize()]
    length = draw(st.sampled_from([3, 4, 4, 5]))
    return [raw(f.WINDOW_UPDATE, 0, stream, increment.to_bytes(4, "big")[:length] + bytes(max(0, length - 4)))]


@st.composite
def header_frames(draw, stream: int, hostile: bool) -> list[bytes]:
    """HEADERS, and CONTINUATIONs where its block is split; hostile: a block that is not one,
    or never ends, a CONTINUATION on another stream, padding past the payload, priority."""
    block = draw(blocks(hostile and draw(st.booleans())))
    cuts = sorted(draw(st.lists(st.integers(0, len(block)), max_size=2)))
    parts = [block[a:b] for a, b in zip([0] + cuts, cuts + [len(block)])]
    fault = draw(st.sampled_from(["block", "no end", "stray", "padding", "priority"])) if hostile else None
    pad, priority = draw(st.sampled_from([None, None, 0, 3])), fault == "priority" or draw(one_in(8))
    end_headers = fault != "no end"
    flags = ["END_STREAM"] * draw(one_in(5)) + ["END_HEADERS"] * (end_headers and len(parts) == 1)
    kw = {"pad_length": pad, "flags": flags + ["PADDED"] * (pad is not None) + ["PRIORITY"] * priority}
    if priority:
        kw.update(depends_on=draw(st.sampled_from([0, 1, 3, stream])), stream_weight=draw(st.integers(0, 255)),
                  exclusive=draw(st.booleans()))
    out = [HeadersFrame(stream, parts[0], **{k: v for k, v in kw.items() if v is not None}).serialize() if stream
           else raw(f.HEADERS, f.END_HEADERS * (len(parts) == 1), 0, parts[0])]
    ftype, flags_byte, _, payload = head(out[0])
    if fault == "padding" and pad is None and len(payload) < 250:  # as long as what follows, or past it
        out[0] = raw(ftype, flags_byte | f.PADDED, stream, bytes([len(payload) + draw(st.integers(0, 2))]) + payload)
    for i, part in enumerate(parts[1:], 2):
        on = draw(st.sampled_from([0, 1, 2, 3])) if fault == "stray" else stream
        last = end_headers and i == len(parts)
        out.append(ContinuationFrame(on, part, flags=["END_HEADERS"] * last).serialize() if on else
                   raw(f.CONTINUATION, f.END_HEADERS * last, 0, part))
    return out


@st.composite
def data_frames(draw, stream: int, hostile: bool) -> list[bytes]:
    size = draw(st.sampled_from([STREAM_WINDOW - 1, STREAM_WINDOW + 1, FRAME, FRAME + 1]) if hostile
                else st.sampled_from([0, 1, 100, 5000]))
    flags = ["END_STREAM"] * draw(one_in(5))
    pad = draw(st.sampled_from([None, None, 0, 10, 255]))
    if not stream or size > FRAME:
        return [raw(f.DATA, f.END_STREAM * bool(flags), stream, bytes(size))]
    if pad is not None and size + pad + 1 > FRAME:
        pad = None
    frame = DataFrame(stream, bytes(size), flags=flags + ["PADDED"] * (pad is not None), pad_length=pad or 0)
    return [frame.serialize()]


@st.composite
def other_frames(draw, stream: int, hostile: bool) -> list[bytes]:
    kinds = ["rst-bad", "ping-bad", "priority-bad", "push", "goaway-bad", "continuation", "unknown"] if hostile \
        else ["rst", "ping", "ping", "priority", "goaway", "unknown"]
    kind = draw(st.sampled_from(kinds))
    if kind == "rst":
        return [RstStreamFrame(stream, error_code=draw(st.sampled_from([0, 8, 0xFF]))).serialize() if stream
                else raw(f.RST_STREAM, 0, 0, bytes(4))]
    if kind == "rst-bad":
        return [raw(f.RST_STREAM, 0, stream, bytes(draw(st.sampled_from([0, 3, 5]))))]
    if kind == "ping":
        return [PingFrame(flags=["ACK"] * draw(st.booleans()), opaque_data=b"12345678").serialize()]
    if kind == "ping-bad":
        ack, on = draw(st.sampled_from([0, f.ACK])), draw(st.sampled_from([0, stream or 1]))
        return [raw(f.PING, ack, on, bytes(draw(st.sampled_from([0, 7, 8, 9]) if not on else st.just(8))))]
    if kind == "priority":
        depends = draw(st.sampled_from([0, 1, 3, stream]))
        return [PriorityFrame(stream, depends_on=depends, stream_weight=15).serialize() if stream
                else raw(f.PRIORITY, 0, 0, bytes(5))]
    if kind == "priority-bad":
        return [raw(f.PRIORITY, 0, stream or 1, bytes(draw(st.sampled_from([4, 6]))))]
    if kind == "push":
        return [raw(f.PUSH_PROMISE, f.END_HEADERS, stream, (2).to_bytes(4, "big") + draw(blocks(False)))]
    if kind == "goaway":
        return [GoAwayFrame(last_stream_id=stream, error_code=draw(st.sampled_from([0, 1, 2]))).serialize()]
    if kind == "goaway-bad":
        return [raw(f.GOAWAY, 0, draw(st.sampled_from([0, stream])), bytes(draw(st.sampled_from([0, 4, 7, 8]))))]
    if kind == "continuation":  # none expected
        return [raw(f.CONTINUATION, draw(st.sampled_from([0, f.END_HEADERS])), stream, draw(blocks(False)))]
    ftype = draw(st.sampled_from([0x0A, 0x0B, 0x0C, 0x10, 0xFA, 0xFF]))
    return [raw(ftype, draw(st.integers(0, 255)), stream, draw(st.binary(max_size=12)))]


KINDS = [header_frames, data_frames, settings_frames, window_updates, other_frames]


@st.composite
def sequences(draw) -> list[bytes]:
    """Up to 12 groups of frames, one in four of them malformed: HEADERS most often on the
    next stream the client may open, other frames on one it opened; now and then a stream
    it may not use (even, skipped, 0)."""
    opened: list[int] = []
    out: list[bytes] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(KINDS)) if opened and not draw(one_in(3)) else header_frames
        fresh = max(opened, default=-1) + 2
        stream = opened[-1] if opened and kind is not header_frames else fresh
        if draw(one_in(4)):
            stream = draw(st.sampled_from([*opened[-3:], fresh, fresh + 2, 2, 0]))
        out += draw(kind(stream, draw(one_in(4))))
        if kind is header_frames and stream & 1 and stream not in opened:
            opened.append(stream)
    return out


# ------------------------------------------------------------------ where the two may differ
class Case(NamedTuple):
    frames: list[bytes]
    at: int  # the first frame where either side ended the connection
    router: Verdict
    h2: Verdict

    @property
    def frame(self) -> tuple[int, int, int, bytes]:
        return head(self.frames[self.at])

    def ended(self, side: Verdict, code: int | None = None) -> bool:
        """Whether ``side`` ended the connection at ``at`` (with ``code``, if given)."""
        return side.at == self.at and code in (None, side.code)

    def only(self, side: Verdict, code: int | None = None) -> bool:
        """Whether ``side`` alone ended the connection at ``at``, the other later or never."""
        other = self.h2 if side is self.router else self.router
        return self.ended(side, code) and other.at != self.at

    def block_head(self) -> tuple[int, int, int, bytes]:
        """The HEADERS frame whose header block the frame at ``at`` belongs to (or that frame)."""
        return head(self.frames[self.block_start()])

    def block_start(self) -> int:
        i = self.at
        while i > 0 and head(self.frames[i])[0] == f.CONTINUATION:
            i -= 1
        return i

    def block(self) -> bytes:
        """The header block the frame at ``at`` ends (its HEADERS's padding and priority left out)."""
        start = self.block_start()
        _, flags, _, payload = head(self.frames[start])
        if flags & f.PADDED and payload:
            payload = payload[1:len(payload) - payload[0]]
        block = payload[5:] if flags & f.PRIORITY_FLAG else payload
        return block + b"".join(head(b)[3] for b in self.frames[start + 1:self.at + 1])

    def past_the_stream_cap(self) -> bool:
        """Whether the header block at ``at`` opens a stream when STREAMS are open already."""
        _, _, stream, _ = self.block_head()
        opened, reset = set(), set()
        for data in self.frames[:self.block_start()]:
            ftype, _, on, _ = head(data)
            (opened if ftype == f.HEADERS else reset if ftype == f.RST_STREAM else set()).add(on)
        return bool(stream & 1) and all(s < stream for s in opened) and len(opened - reset) >= STREAMS

    def after(self, ftype: int) -> bool:
        """Whether a frame of ``ftype`` came before the one at ``at``."""
        return any(head(data)[0] == ftype for data in self.frames[:self.at])


def _depends_on_itself(frame: tuple[int, int, int, bytes]) -> bool:
    ftype, flags, stream, payload = frame
    if ftype == f.HEADERS and flags & f.PRIORITY_FLAG:
        payload = payload[1:] if flags & f.PADDED else payload
    elif ftype != f.PRIORITY:
        return False
    return len(payload) >= 4 and int.from_bytes(payload[:4], "big") & 0x7FFFFFFF == stream


def _padding_fills(frame: tuple[int, int, int, bytes]) -> bool:
    """A padded HEADERS frame whose padding is shorter than its payload (RFC 9113 6.2 takes it)
    but leaves no room for the fields before it."""
    ftype, flags, _, payload = frame
    fields = 1 + 5 * bool(flags & f.PRIORITY_FLAG)
    return ftype == f.HEADERS and flags & f.PADDED and 0 < len(payload) and \
        len(payload) - fields < payload[0] < len(payload)


def _padding_is_all(frame: tuple[int, int, int, bytes]) -> bool:
    """A padded HEADERS frame with no priority whose padding is all that follows its Pad Length."""
    ftype, flags, _, payload = frame
    return ftype == f.HEADERS and flags & f.PADDED and not flags & f.PRIORITY_FLAG and 0 < len(payload) and \
        payload[0] == len(payload) - 1


def _decodes(block: bytes) -> bool:
    """Whether hpack decodes ``block`` (with an empty table) within the header list size."""
    decoder = hpack.Decoder()
    decoder.max_header_list_size = HEADER_LIST
    try:
        decoder.decode(block, raw=True)
    except hpack.HPACKError:
        return False
    return True


def _late_size_update(case: Case) -> bool:
    """Whether the header block ending at ``at`` is good but for a table size update (to 4096)
    after its first field."""
    block = case.block()
    return case.block_head()[0] == f.HEADERS and b"\x3f\xe1\x1f" in block[1:] \
        and _decodes(block.replace(b"\x3f\xe1\x1f", b""))


def _in_block(case: Case) -> bool:
    """Whether the frame at ``at`` comes inside a header block (its last frame had no END_HEADERS)."""
    ftype, flags, _, _ = head(case.frames[case.at - 1]) if case.at else (None, f.END_HEADERS, 0, b"")
    return ftype in (f.HEADERS, f.CONTINUATION) and not flags & f.END_HEADERS


class Allowed(NamedTuple):
    why: str  # one line, and the RFC section
    applies: Callable[[Case], bool]


ALLOWED: list[Allowed] = [
    # ---- the router is stricter, by its own limits (each a choice RFC 9113 leaves to it)
    Allowed("the router's control-frame budgets (FLOOD_BUDGET): RFC 9113 10.5 lets an endpoint end a connection "
            "that abuses frames with ENHANCE_YOUR_CALM; h2 has none",
            lambda c: c.only(c.router, f.ENHANCE_YOUR_CALM) and c.frame[0] in FLOODS),
    Allowed("a stream past MAX_CONCURRENT_STREAMS: RFC 9113 5.1.2 says PROTOCOL_ERROR or REFUSED_STREAM; the router "
            "refuses the stream alone (RST_STREAM REFUSED_STREAM), h2 ends the connection",
            lambda c: c.only(c.h2, f.PROTOCOL_ERROR) and c.block_head()[0] == f.HEADERS and c.past_the_stream_cap()),
    Allowed("a header list past SETTINGS_MAX_HEADER_LIST_SIZE: the router refuses that stream alone with "
            "RESOURCE_EXHAUSTED (RFC 9113 10.5.1 allows either), h2 ends the connection",
            lambda c: c.only(c.h2, f.ENHANCE_YOUR_CALM)),
    # ---- the router ends the connection where RFC 9113 asks for a stream error (5.4.1 allows it)
    Allowed("HEADERS or DATA on a stream the client ended (half-closed remote): a stream error STREAM_CLOSED "
            "(RFC 9113 5.1); the router ends the connection (5.4.1), so no call ends twice; h2 resets the stream, "
            "or waits for the end of the header block",
            lambda c: c.only(c.router, f.STREAM_CLOSED)),
    Allowed("WINDOW_UPDATE taking a stream's send window past 2^31-1: RFC 9113 6.9.1 resets the stream (h2 does); "
            "the router ends the connection (5.4.1)",
            lambda c: c.only(c.router, f.FLOW_CONTROL_ERROR) and c.frame[0] == f.WINDOW_UPDATE and c.frame[2]),
    Allowed("HEADERS on a stream already closed: RFC 9113 5.1 lets that be a connection error; the router's is "
            "PROTOCOL_ERROR (5.1.1: a stream id used again), h2 resets a stream the client reset",
            lambda c: c.only(c.router, f.PROTOCOL_ERROR) and c.block_head()[0] == f.HEADERS and c.block_head()[2] & 1
            and any(head(b)[:3:2] == (f.HEADERS, c.block_head()[2]) for b in c.frames[:c.block_start()])),
    Allowed("DATA past the stream window on a stream already closed: the router checks the window from the frame "
            "header whatever the stream's state (RFC 9113 6.9.1); h2 counts a closed stream's DATA against the "
            "connection's window only",
            lambda c: c.only(c.router, f.FLOW_CONTROL_ERROR) and c.frame[0] == f.DATA
            and len(c.frame[3]) > STREAM_WINDOW),
    Allowed("a HEADERS frame the client may not send (an even stream, 5.1.1; no END_STREAM on an open one, 8.1): "
            "the router says so when the frame comes, h2 once its header block is whole",
            lambda c: c.only(c.router, f.PROTOCOL_ERROR) and c.frame[0] == f.HEADERS
            and not c.frame[1] & f.END_HEADERS),
    Allowed("a header block on a stream it may not be on (5.1, 5.1.1) that is also undecodable or too large: "
            "either error may be reported (RFC 9113 5.4); the router judges the stream first, h2 decodes first",
            lambda c: c.ended(c.router) and c.ended(c.h2) and c.block_head()[0] == f.HEADERS
            and c.router.code in (f.PROTOCOL_ERROR, f.STREAM_CLOSED)
            and c.h2.code in (f.PROTOCOL_ERROR, f.ENHANCE_YOUR_CALM) and not _decodes(c.block())),
    Allowed("a malformed frame in the middle of a header block: either error may be reported (RFC 9113 5.4); "
            "the router reports the block cut (6.2), hyperframe the frame's own fault first",
            lambda c: c.ended(c.router, f.PROTOCOL_ERROR) and c.ended(c.h2) and c.frame[0] != f.CONTINUATION
            and _in_block(c)),
    # ---- either code is right
    Allowed("a header block that does not decode: COMPRESSION_ERROR (RFC 9113 4.3); h2 sends PROTOCOL_ERROR, "
            "the generic code 5.4 lets any endpoint use",
            lambda c: c.ended(c.router, f.COMPRESSION_ERROR) and c.ended(c.h2, f.PROTOCOL_ERROR)),
    Allowed("a frame both over SETTINGS_MAX_FRAME_SIZE and on a stream it may not be on: either error may be "
            "reported (RFC 9113 5.4); the router reads the length first, hyperframe the stream",
            lambda c: c.ended(c.router, f.FRAME_SIZE_ERROR) and c.ended(c.h2, f.PROTOCOL_ERROR)
            and len(c.frame[3]) > FRAME),
    Allowed("a padded HEADERS frame whose padding leaves no room for its priority fields: too small for its "
            "fields, FRAME_SIZE_ERROR (RFC 9113 4.2); h2 counts it as padding too long, PROTOCOL_ERROR",
            lambda c: c.ended(c.router, f.FRAME_SIZE_ERROR) and c.ended(c.h2, f.PROTOCOL_ERROR)
            and _padding_fills(c.frame)),
    # ---- h2 differs from RFC 9113
    Allowed("SETTINGS with ACK and a payload: FRAME_SIZE_ERROR (RFC 9113 6.5); hyperframe refuses it as bad data, "
            "which h2 sends as PROTOCOL_ERROR",
            lambda c: c.ended(c.router, f.FRAME_SIZE_ERROR) and c.ended(c.h2, f.PROTOCOL_ERROR)
            and c.frame[0] == f.SETTINGS and c.frame[1] & f.ACK),
    Allowed("padding as long as what follows the Pad Length: RFC 9113 6.2 refuses only padding as long as the "
            "payload or longer; hyperframe leaves the Pad Length byte out of the payload",
            lambda c: c.only(c.h2, f.PROTOCOL_ERROR) and _padding_is_all(c.block_head())),
    Allowed("a stream that depends on itself: an error in RFC 7540 5.3.1, which h2 keeps; RFC 9113 deprecates "
            "priority signals (5.3.2) and drops the rule (6.3), and the router ignores them",
            lambda c: c.only(c.h2, f.PROTOCOL_ERROR) and _depends_on_itself(c.block_head())),
    Allowed("SETTINGS_ENABLE_CONNECT_PROTOCOL (0x8) is RFC 8441's, which the router does not implement: a setting "
            "it does not know MUST be ignored (RFC 9113 6.5.2); h2 checks its value",
            lambda c: c.only(c.h2, f.PROTOCOL_ERROR) and c.frame[0] == f.SETTINGS
            and any(c.frame[3][i:i + 2] == b"\x00\x08" for i in range(0, len(c.frame[3]), 6))),
    Allowed("ALTSVC (0xA) is RFC 7838's, which the router does not implement: a frame type it does not know MUST "
            "be ignored (RFC 9113 5.5); h2 parses it and refuses a malformed one",
            lambda c: c.only(c.h2) and c.frame[0] == 0x0A),
    Allowed("WINDOW_UPDATE's reserved bit MUST be ignored (RFC 9113 6.9, 4.1); hyperframe counts it in the "
            "increment and refuses the frame",
            lambda c: c.ended(c.h2, f.PROTOCOL_ERROR) and c.frame[0] == f.WINDOW_UPDATE
            and len(c.frame[3]) == 4 and c.frame[3][0] & 0x80),
    Allowed("RST_STREAM on an idle stream: PROTOCOL_ERROR (RFC 9113 6.4); h2 ignores it once any stream is open",
            lambda c: c.only(c.router, f.PROTOCOL_ERROR) and c.frame[0] == f.RST_STREAM),
    Allowed("a CONTINUATION that follows no header block: PROTOCOL_ERROR (RFC 9113 6.10); h2 looks up its stream "
            "first and may say STREAM_CLOSED",
            lambda c: c.ended(c.router, f.PROTOCOL_ERROR) and c.ended(c.h2, f.STREAM_CLOSED)
            and c.frame[0] == f.CONTINUATION),
    Allowed("a dynamic table size update after a field: RFC 7541 4.2 puts it at the start of a block, and hpack "
            "refuses it; the router's decoder applies it (a decoder check RFC 7541 does not spell out; it belongs "
            "in hpack_codec.py)",
            lambda c: c.only(c.h2, f.PROTOCOL_ERROR) and _late_size_update(c)),
    Allowed("frames after the client's GOAWAY: RFC 9113 6.8 lets its sender go on with the streams it has; "
            "h2's state machine takes nothing after it",
            lambda c: c.ended(c.h2, f.PROTOCOL_ERROR) and c.after(f.GOAWAY)),
]


def allowed(case: Case) -> Allowed | None:
    return next((a for a in ALLOWED if a.applies(case)), None)


# ------------------------------------------------------------------ the property
CALL = hpack.Encoder().encode(REQUEST)


@settings(settings.get_profile("h2-oracle"))
@given(sequences(), st.sampled_from([1000, 1, 7, 4096, 5000]))
# What the router let pass before this oracle (each a connection error, RFC 9113 5.1, 6.4, 8.4):
@example([raw(f.DATA, 0, 1, b"x")], 1000)  # DATA on an idle stream
@example([raw(f.DATA, 0, 2, bytes(5000))], 1000)  # on a stream only the server may open, streamed when cut
@example([raw(f.WINDOW_UPDATE, 0, 3, (1).to_bytes(4, "big"))], 1000)  # on an idle stream
@example([raw(f.RST_STREAM, 0, 1, bytes(4))], 1000)  # on an idle stream
@example([raw(f.PUSH_PROMISE, f.END_HEADERS, 1, (2).to_bytes(4, "big") + CALL)], 1)  # from a client
def test_the_router_and_h2_give_the_same_verdict_on_the_same_frames(frames: list[bytes], cut: int) -> None:
    router, h2 = router_verdict(frames), h2_verdict(frames)
    assert router_verdict(frames, cut).code == router.code  # however the socket cuts them
    if router == h2:
        return
    at = min(v.at for v in (router, h2) if v.at is not None)
    case = Case(frames, at, router, h2)
    assert allowed(case) is not None, (f"router {router}, h2 {h2} at frame {at}: {case.frame[:3]} "
                                       f"{case.frame[3][:40]!r}\n" + "\n".join(repr(head(b)[:3]) for b in frames))
