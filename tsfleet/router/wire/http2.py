"""Just enough HTTP/2 (RFC 9113) for the gRPC router: frames, flow control, both ends.

grpcio's Python server and client cost the router ~0.6 ms of CPU per call (its poller
thread hands every completed operation to the event loop through the GIL). A router
forwards gRPC messages; it needs HTTP/2's framing, header compression and flow control,
not a gRPC runtime. ``Http2Connection`` is one connection of either side: subclasses get
``on_headers`` / ``on_data`` / ``on_reset`` / ``on_goaway`` and send with ``send``.

Flow control: what the peer sends is credited back as soon as it is read (the router holds
at most a message per stream, bounded by the caller); what the router sends waits for the
peer's window, in order, per stream.
"""
from __future__ import annotations

import asyncio
import logging
import struct
from collections import deque

from tsfleet.router.wire import hpack_codec
from tsfleet.router.wire.h2frames import (ACK, COMPRESSION_ERROR, CONTINUATION, DATA, DEFAULT_FRAME, DEFAULT_WINDOW,
                                          END_HEADERS, END_STREAM, ENHANCE_YOUR_CALM, FLOOD_BUDGET,
                                          FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, GOAWAY, HEAD, HEADERS, LARGE,
                                          MAX_WINDOW, NO_ERROR, PADDED, PING, PREFACE, PRIORITY_FLAG,
                                          PROTOCOL_ERROR, RECV_CONCURRENT_STREAMS, RECV_CONN_WINDOW,
                                          RECV_FRAME, RECV_HEADER_LIST, RECV_STREAM_WINDOW, RST_STREAM, SETTINGS,
                                          S_ENABLE_PUSH, S_HEADER_TABLE_SIZE, S_INITIAL_WINDOW_SIZE,
                                          S_MAX_CONCURRENT_STREAMS, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE,
                                          WINDOW_UPDATE, Floods, ProtocolError, check_frame, check_setting,
                                          check_stream, frame, settings_frame, streamed)
from tsfleet.router.wire.h2send import FlowControlledSender
from tsfleet.router.wire.hpack_codec import Header, HeaderListTooLarge, HpackError

log = logging.getLogger(__name__)


class Http2Connection(FlowControlledSender, asyncio.Protocol):
    """Frame parsing, SETTINGS/PING/WINDOW_UPDATE handling and flow-controlled sending."""

    client_side = False
    # What this end lets the peer send (class attributes so a test can make them small).
    frame_in, stream_window_in, conn_window_in = RECV_FRAME, RECV_STREAM_WINDOW, RECV_CONN_WINDOW
    header_list_in, streams_in = RECV_HEADER_LIST, RECV_CONCURRENT_STREAMS
    max_unread = 1 << 62  # bytes written and not yet taken by the peer (a client's side caps it)

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.preface_pending = not self.client_side
        self.decoder = hpack_codec.Decoder(max_list=self.header_list_in)
        self.peer_window = DEFAULT_WINDOW  # the peer's SETTINGS_INITIAL_WINDOW_SIZE
        self.peer_frame = DEFAULT_FRAME
        self.conn_window = DEFAULT_WINDOW  # what the router may still send on the connection
        self.windows: dict[int, int] = {}  # per open stream: what the router may still send
        self.blocked: dict[int, deque] = {}  # per stream: (kind, payload, end) waiting for window
        self.unacked = 0  # received on the connection and not yet credited back
        self.stream_unacked: dict[int, int] = {}
        self.continuing: tuple[int, int, bytearray] | None = None
        self.streaming: tuple[int, int, int] | None = None  # (stream, flags, bytes left) of a DATA frame
        self.outgoing: list[bytes | memoryview] = []
        self.vectored = False  # whether what is queued holds a large payload, not worth joining
        self.closed = False
        self.floods = Floods()
        self.peer_high = self.own_high = 0  # the highest stream the peer, and this end, opened (check_stream)

    # ---------------------------------------------------------------- wiring
    def _write(self, data: bytes) -> None:
        self._write_pieces([data])

    def _write_pieces(self, pieces: list[bytes | memoryview]) -> None:
        """Queue frames for the socket, whole or in pieces (frame headers, views of payloads).
        Everything queued in one turn of the event loop goes out in one write (one syscall, the
        largest part of a proxied call's cost when many calls share a connection): joined
        once, or, when a large payload is among them, handed over as they are (a vectored
        write with uvloop, so a large message is not copied on its way out)."""
        if not self.outgoing:
            self.loop.call_soon(self._flush)
        self.outgoing += pieces

    def _flush(self) -> None:
        if self.outgoing and self.transport is not None and not self.transport.is_closing():
            if self.vectored:  # large payloads: handed to the socket as they are (uvloop: one writev)
                self.transport.writelines(self.outgoing)
            else:
                self.transport.write(b"".join(self.outgoing))
            # A peer that opens its windows wide and never reads leaves all it asked for here:
            # answers, and the ACKs of its PINGs and SETTINGS.
            if self.transport.get_write_buffer_size() > self.max_unread:
                self.unread()
        self.outgoing.clear()
        self.vectored = False

    def unread(self) -> None:
        """The peer has left over ``max_unread`` bytes unread: drop the connection and them."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        hello = settings_frame({S_ENABLE_PUSH: 0, S_MAX_CONCURRENT_STREAMS: self.streams_in,
                                S_INITIAL_WINDOW_SIZE: self.stream_window_in, S_MAX_FRAME_SIZE: self.frame_in,
                                S_MAX_HEADER_LIST_SIZE: self.header_list_in})
        if self.conn_window_in > DEFAULT_WINDOW:
            hello += frame(WINDOW_UPDATE, 0, 0, (self.conn_window_in - DEFAULT_WINDOW).to_bytes(4, "big"))
        self._write((PREFACE if self.client_side else b"") + hello)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.on_closed(str(exc) if exc else "connection closed")

    def goaway(self, last_stream: int, code: int = NO_ERROR, message: str = "") -> None:
        """Tell the peer no stream after ``last_stream`` will be served (the connection stays)."""
        if self.transport is not None and not self.closed:
            self._write(frame(GOAWAY, 0, 0, struct.pack(">II", last_stream, code) + message.encode()))

    def close(self, code: int = NO_ERROR, message: str = "", last_stream: int = 0) -> None:
        if self.transport is not None and not self.closed:
            self.goaway(last_stream, code, message)
            self._flush()
            self.transport.close()
        self.closed = True

    def data_received(self, data: bytes) -> None:
        pos = 0
        if self.streaming is not None:  # inside a large DATA frame: its bytes go on as they come
            pos = self._more_data(data)
            if self.streaming is not None or self.closed:
                return
        elif self.buffer or self.preface_pending:
            buf = self.buffer
            buf += data
            if not self.preface_pending and len(buf) >= 9:
                length = int.from_bytes(buf[:3], "big")
                if len(buf) < 9 + length <= 9 + self.frame_in and not streamed(buf[3], buf[4], length):
                    return  # the frame is not whole yet: no copy of it per read
            data = bytes(buf)  # frames are cut from bytes: one copy, not two per payload
            buf.clear()
        if self.preface_pending:
            if len(data) < len(PREFACE):
                self.buffer += data
                return
            if data[:len(PREFACE)] != PREFACE:
                self.close(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                return
            self.preface_pending, pos = False, len(PREFACE)
        end = len(data)
        unpack = HEAD.unpack_from
        view: memoryview | None = None
        try:
            while end - pos >= 9 and not self.closed:
                length_type, flags, stream = unpack(data, pos)
                length, ftype, stream = length_type >> 8, length_type & 0xFF, stream & 0x7FFFFFFF
                if length > self.frame_in:
                    raise ProtocolError(FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if ftype != DATA:
                    if end - pos - 9 < length:
                        break  # not whole yet
                    start, pos = pos + 9, pos + 9 + length
                    self._frame(ftype, flags, stream, data[start:pos])
                    continue
                # DATA, every call's message: read here, not in _frame (a fifth of a proxied
                # call's reading was the calls and checks on its way there).
                used = self.stream_unacked.get(stream)
                if used is None or self.continuing is not None:  # rare: no stream open to DATA (5.1)
                    check_stream(self, DATA, flags, stream)  # or a header block cut (6.2)
                    used = 0
                if self.unacked + length > self.conn_window_in or used + length > self.stream_window_in:
                    # RFC 9113 6.9.1: past what this end has given (it gives back half a window
                    # at a time, as it reads), checked on the frame's header, before its bytes.
                    raise ProtocolError(FLOW_CONTROL_ERROR, f"DATA of {length} bytes past the window")
                if end - pos - 9 < length:
                    if length > LARGE and not flags & PADDED:  # a large frame's first part: no buffering
                        self.streaming = (stream, flags, length)
                        view = view or memoryview(data)
                        pos = end if pos + 9 == end else pos + 9 + self._more_data(view[pos + 9:])
                    break
                start, pos = pos + 9, pos + 9 + length
                if flags & PADDED:
                    self._frame(DATA, flags, stream, data[start:pos])
                    continue
                if length > LARGE:  # a view: the receiver copies it where it keeps it
                    view = view or memoryview(data)
                    payload = view[start:pos]
                else:
                    payload = data[start:pos]
                self._credit(stream, length, flags & END_STREAM)
                self.on_data(stream, payload, bool(flags & END_STREAM))
        except (ProtocolError, HpackError) as exc:
            code = exc.code if isinstance(exc, ProtocolError) else \
                ENHANCE_YOUR_CALM if isinstance(exc, HeaderListTooLarge) else COMPRESSION_ERROR
            log.info("closing an HTTP/2 connection: %s", exc)
            self.close(code, str(exc))
            return
        if pos < end:
            self.buffer += memoryview(data)[pos:]

    def _more_data(self, data: bytes | memoryview) -> int:
        """Pass on what ``data`` holds of the DATA frame being streamed; returns its length."""
        assert self.streaming is not None
        stream, flags, left = self.streaming
        n = min(left, len(data))
        if n < len(data):
            data = memoryview(data)[:n]
        last = n == left
        self.streaming = None if last else (stream, flags, left - n)
        ended = last and flags & END_STREAM
        self._credit(stream, n, ended)
        self.on_data(stream, data, bool(ended))
        return n

    # --------------------------------------------------------------- frames
    def _frame(self, ftype: int, flags: int, stream: int, payload: bytes | memoryview) -> None:
        """Every frame but an unpadded DATA frame (data_received reads those itself)."""
        if self.continuing is not None and ftype != CONTINUATION:
            raise ProtocolError(PROTOCOL_ERROR, "header block interrupted")
        if ftype == HEADERS:
            if not stream or flags & (PADDED | PRIORITY_FLAG):  # check_frame's checks for HEADERS
                check_frame(ftype, flags, stream, payload)
            # check_stream's two common cases inline: the peer opens its next stream, or answers
            # on one of this end's that is open (trailers, an answer's headers).
            if stream & 1 != self.client_side:
                if stream > self.peer_high and stream not in self.windows:
                    self.peer_high = stream
                else:
                    check_stream(self, HEADERS, flags, stream)
            elif stream > self.own_high:  # one of this end's: an answer on a stream it opened, or
                check_stream(self, HEADERS, flags, stream)  # an error (idle); ended ones ignored
            if flags & END_STREAM:  # trailers, or a call without a body: no DATA follows
                self.stream_unacked.pop(stream, None)
            else:
                self.stream_unacked.setdefault(stream, 0)  # DATA may follow: its window is kept
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            if len(payload) > 4 * self.header_list_in:
                raise ProtocolError(ENHANCE_YOUR_CALM, f"header block over {4 * self.header_list_in} bytes")
            if flags & END_HEADERS:
                self.on_headers(stream, self.decoder.decode(payload), bool(flags & END_STREAM))
            else:
                self.continuing = (stream, flags, bytearray(payload))
            return
        if ftype == WINDOW_UPDATE and len(payload) == 4:  # check_frame's one rule for it, inline:
            increment = int.from_bytes(payload, "big") & 0x7FFFFFFF  # each answer brings one or two
            if increment == 0:  # RFC 9113 6.9: a stream error; here the connection's, as 5.4.1 allows
                raise ProtocolError(PROTOCOL_ERROR, f"WINDOW_UPDATE of 0 on stream {stream}")
            if stream == 0:
                window = self.conn_window = self.conn_window + increment
            elif stream in self.windows:
                window = self.windows[stream] = self.windows[stream] + increment
            else:  # an ended stream's is ignored (5.1), an idle one's is an error
                check_stream(self, WINDOW_UPDATE, flags, stream)
                return
            if window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, f"a window of stream {stream} past 2^31-1")
            if self.blocked:
                self._unblock()
            return
        check_frame(ftype, flags, stream, payload)  # lengths, stream 0 or not, padding
        if ftype in FLOOD_BUDGET and (ftype == RST_STREAM or not flags & ACK):  # an ACK is our own echoed
            self.floods.spend(ftype, self.loop.time())
        if ftype == DATA:  # padded (data_received reads the others)
            size = len(payload)
            if flags & PADDED:
                payload = payload[1:len(payload) - payload[0]]
            self._credit(stream, size, flags & END_STREAM)
            self.on_data(stream, payload, bool(flags & END_STREAM))
        elif ftype == CONTINUATION:
            if self.continuing is None or self.continuing[0] != stream:
                raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
            # Encoded, a list is at most about 4 times its decoded size (Huffman's longest codes
            # are 30 bits a byte): past that the block is refused before it is all buffered.
            if len(self.continuing[2]) + len(payload) > 4 * self.header_list_in:
                raise ProtocolError(ENHANCE_YOUR_CALM, f"header block over {4 * self.header_list_in} bytes")
            self.continuing[2].extend(payload)
            if flags & END_HEADERS:
                stream, first, block = self.continuing
                self.continuing = None
                self.on_headers(stream, self.decoder.decode(bytes(block)), bool(first & END_STREAM))
        elif ftype == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
        elif ftype == PING:
            if not flags & ACK:
                self._write(frame(PING, ACK, 0, payload))
        elif ftype == RST_STREAM:
            check_stream(self, RST_STREAM, flags, stream)  # an idle stream's is an error (6.4)
            self._forget(stream)
            self.on_reset(stream, int.from_bytes(payload, "big"))
        elif ftype == GOAWAY:
            last, code = struct.unpack(">II", payload[:8])
            self.on_goaway(last & 0x7FFFFFFF, code, payload[8:].decode(errors="replace"))
        # PRIORITY, PUSH_PROMISE (refused by our SETTINGS) and unknown types: ignored

    def _settings(self, payload: bytes) -> None:
        for i in range(0, len(payload), 6):  # check_frame: a multiple of 6
            key, value = struct.unpack(">HI", payload[i:i + 6])
            check_setting(key, value)
            if key == S_INITIAL_WINDOW_SIZE:
                delta, self.peer_window = value - self.peer_window, value
                for stream in self.windows:
                    self.windows[stream] += delta
                    if self.windows[stream] > MAX_WINDOW:
                        raise ProtocolError(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE takes stream {stream} past 2^31-1")
            elif key == S_MAX_FRAME_SIZE:
                self.peer_frame = value
            elif key == S_HEADER_TABLE_SIZE:
                pass  # the encoder never indexes; nothing to shrink
        self._write(frame(SETTINGS, ACK, 0))
        self._unblock()

    def _credit(self, stream: int, size: int, ended: int) -> None:
        """Give the window back once half of it is used: the router does not hold data back."""
        self.unacked += size
        update = b""
        if self.unacked >= self.conn_window_in // 2:
            update = frame(WINDOW_UPDATE, 0, 0, self.unacked.to_bytes(4, "big"))
            self.unacked = 0
        if ended:
            self.stream_unacked.pop(stream, None)
        elif (used := self.stream_unacked.get(stream)) is not None:  # one whose HEADERS came (DATA on others kept an entry each: 100,000 once)
            used += size
            if used >= self.stream_window_in // 2:
                update += frame(WINDOW_UPDATE, 0, stream, used.to_bytes(4, "big"))
                used = 0
            self.stream_unacked[stream] = used
        if update:
            self._write(update)

    # ------------------------------------------------------------- streams
    def open_stream(self, stream: int) -> None:
        self.windows[stream] = self.peer_window
        if stream > self.own_high and stream & 1 == self.client_side:
            self.own_high = stream

    def _forget(self, stream: int) -> None:
        self.windows.pop(stream, None)
        self.blocked.pop(stream, None)
        self.stream_unacked.pop(stream, None)

    # ----------------------------------------------------- for subclasses
    def on_headers(self, stream: int, headers: list[Header], end: bool) -> None:
        raise NotImplementedError

    def on_data(self, stream: int, data: bytes | memoryview, end: bool) -> None:
        raise NotImplementedError

    def on_reset(self, stream: int, code: int) -> None:
        pass

    def on_goaway(self, last_stream: int, code: int, message: str) -> None:
        pass

    def on_closed(self, reason: str) -> None:
        pass
