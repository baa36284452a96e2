"""The router's HTTP/2 layer between two of its own connections on loopback, with the
small frames and windows that HTTP/2 starts with: header blocks split into CONTINUATION
frames, data held back until the peer's WINDOW_UPDATE, PING answered."""
from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from tests.wire import Wire
from tsfleet.router.wire.h2frames import (ACK, COMPRESSION_ERROR, DATA, DEFAULT_FRAME, DEFAULT_WINDOW, END_HEADERS,
                                     END_STREAM, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR, GOAWAY, HEADERS, PADDED, PING,
                                     PREFACE, PRIORITY, PRIORITY_FLAG, PROTOCOL_ERROR, PUSH_PROMISE, RST_STREAM,
                                     S_ENABLE_PUSH, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, SETTINGS, STREAM_CLOSED,
                                     WINDOW_UPDATE, frame, settings_frame)
from tsfleet.router.wire.http2 import Http2Connection


class Peer(Http2Connection):
    frame_in, stream_window_in, conn_window_in = DEFAULT_FRAME, DEFAULT_WINDOW, DEFAULT_WINDOW

    def __init__(self, client_side: bool):
        self.client_side = client_side
        super().__init__()
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def on_headers(self, stream: int, headers: list, end: bool) -> None:
        self.events.put_nowait(("headers", stream, headers, end))

    def on_data(self, stream: int, data: bytes, end: bool) -> None:
        self.events.put_nowait(("data", stream, data, end))

    def data_received(self, data: bytes) -> None:
        if not self.client_side and b"\x00\x00\x08\x06\x01" in data:  # a PING ACK (8 bytes, type 6, ACK)
            self.events.put_nowait(("pong",))
        super().data_received(data)


async def pair() -> tuple[Peer, Peer, asyncio.base_events.Server]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Peer] = loop.create_future()

    def server_side() -> Peer:
        peer = Peer(False)
        if not accepted.done():
            accepted.set_result(peer)
        return peer

    server = await loop.create_server(server_side, "127.0.0.1", 0)
    _, client = await loop.create_connection(lambda: Peer(True), "127.0.0.1", server.sockets[0].getsockname()[1])
    return client, await asyncio.wait_for(accepted, 5), server


async def call_of(peer: Peer, stream: int) -> tuple[list, bytes, list | None]:
    """The headers, the whole body and the trailers of ``stream`` as ``peer`` received them."""
    kind, got_stream, headers, end = await asyncio.wait_for(peer.events.get(), 5)
    assert (kind, got_stream) == ("headers", stream)
    body, trailers = bytearray(), None
    while not end:
        kind, got_stream, data, end = await asyncio.wait_for(peer.events.get(), 5)
        assert got_stream == stream
        if kind == "headers":
            assert end
            trailers = data
        else:
            body += data
    return headers, bytes(body), trailers


def test_big_headers_and_a_body_over_the_window_arrive_whole_both_ways() -> None:
    async def main() -> None:
        client, server, listener = await pair()
        try:
            headers = [(b":path", b"/x"), (b"x-note", b"n" * 40_000), (b"x-more", b"m" * 20_000)]
            body = bytes(range(256)) * 1200  # 300 KB: over 64 KB windows and 16 KB frames
            client.open_stream(1)
            client.send(1, headers, body, end=True)
            assert await call_of(server, 1) == (headers, body, None)
            server.open_stream(1)
            server.send(1, [(b":status", b"200")] + headers[1:], body[::-1], [(b"grpc-status", b"0")])
            assert await call_of(client, 1) == ([(b":status", b"200")] + headers[1:], body[::-1], [(b"grpc-status", b"0")])
            assert not client.blocked and not server.blocked  # nothing left waiting for a window
        finally:
            client.close()
            listener.close()

    asyncio.run(main())


def test_a_ping_is_answered() -> None:
    async def main() -> None:
        client, server, listener = await pair()
        try:
            server.transport.write(frame(PING, 0, 0, b"12345678"))
            assert await asyncio.wait_for(server.events.get(), 5) == ("pong",)
        finally:
            client.close()
            listener.close()

    asyncio.run(main())


def _received(chunk: int, data: bytes) -> list[tuple[Any, ...]]:
    """What a server-side peer makes of ``data`` read ``chunk`` bytes at a time."""
    async def main() -> list[tuple[Any, ...]]:
        peer = Peer(False)
        peer.connection_made(Wire())  # type: ignore[arg-type]
        for i in range(0, len(data), chunk):
            peer.data_received(data[i:i + chunk])
        return [peer.events.get_nowait() for _ in range(peer.events.qsize())]

    return asyncio.run(main())


def _as_read(events: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Events with each run of DATA joined: a large DATA frame is passed on as it arrives,
    in as many pieces as the socket cut it into."""
    out: list[tuple[Any, ...]] = []
    for event in events:
        if event[0] == "data" and out and out[-1][0] == "data" and out[-1][1] == event[1] and not out[-1][3]:
            out[-1] = ("data", event[1], out[-1][2] + bytes(event[2]), event[3])
        else:
            out.append(event if event[0] != "data" else ("data", event[1], bytes(event[2]), event[3]))
    return out


def test_frames_cut_anywhere_by_the_socket_are_read_the_same() -> None:
    sender = Peer(True)
    sender.open_stream(1)
    out: list[bytes] = []
    sender._header_frames(out, 1, [(b":path", b"/x"), (b"x-note", b"n" * 300)], False)
    body = bytes(range(256)) * 50
    sender._data_frames(out, 1, body, False)  # one frame over LARGE: passed on in pieces as they come
    padded = bytes(range(200)) * 30  # a padded one is read whole first
    out.append(frame(DATA, PADDED | END_STREAM, 1, bytes([7]) + padded + bytes(7)))
    out.append(frame(PING, 0, 0, b"12345678"))
    data = PREFACE + settings_frame({}) + b"".join(out)
    whole = _as_read(_received(len(data), data))
    assert whole == [("headers", 1, [(b":path", b"/x"), (b"x-note", b"n" * 300)], False),
                     ("data", 1, body + padded, True)]
    for chunk in (1, 7, 9, 100, 4096, 5000, 13000):
        assert _as_read(_received(chunk, data)) == whole, chunk


def test_a_frame_over_the_agreed_size_closes_the_connection_before_its_payload_comes() -> None:
    async def main() -> None:
        peer = Peer(False)
        wire = Wire()
        peer.connection_made(wire)  # type: ignore[arg-type]
        peer.data_received(PREFACE + settings_frame({}))
        header = frame(DATA, 0, 1, bytes(DEFAULT_FRAME + 1))[:9]  # the header only: the payload never comes
        for i in range(9):  # as the socket may cut it
            peer.data_received(header[i:i + 1])
        assert wire.closed
        # type GOAWAY, no flags, stream 0; last stream 0, FRAME_SIZE_ERROR
        assert bytes([GOAWAY, 0]) + bytes(8) + FRAME_SIZE_ERROR.to_bytes(4, "big") in wire.written

    asyncio.run(main())


def _goaway_for(data: bytes, cut: int = 0) -> tuple[bool, int | None]:
    """Whether a server-side peer closed on ``data`` (after the preface, SETTINGS, and the
    HEADERS that open stream 1), read whole or ``cut`` bytes at a time, and the error code of
    the GOAWAY it sent."""
    async def main() -> tuple[bool, int | None]:
        peer = Peer(False)
        wire = Wire()
        peer.connection_made(wire)  # type: ignore[arg-type]
        peer.data_received(PREFACE + settings_frame({}) + frame(HEADERS, END_HEADERS, 1, b"\x84"))  # :path /
        peer.open_stream(1)  # as a server opens the stream it answers
        for i in range(0, len(data), cut or len(data)):
            peer.data_received(data[i:i + (cut or len(data))])
        peer._flush()
        written = bytes(wire.written)
        at = written.find(bytes([GOAWAY, 0]) + bytes(4))  # type GOAWAY, no flags, stream 0
        return wire.closed, (int.from_bytes(written[at + 10:at + 14], "big") if at >= 0 else None)

    return asyncio.run(main())


def _settings(key: int, value: int) -> bytes:
    return frame(SETTINGS, 0, 0, struct.pack(">HI", key, value))


@pytest.mark.parametrize("data,code", [
    (_settings(S_MAX_FRAME_SIZE, 0), PROTOCOL_ERROR),  # froze the event loop once (a splitter cutting 0 bytes)
    (_settings(S_MAX_FRAME_SIZE, 1), PROTOCOL_ERROR),
    (_settings(S_MAX_FRAME_SIZE, 2**24), PROTOCOL_ERROR),
    (_settings(S_INITIAL_WINDOW_SIZE, 2**31), FLOW_CONTROL_ERROR),
    (_settings(S_INITIAL_WINDOW_SIZE, 2**32 - 1), FLOW_CONTROL_ERROR),
    (_settings(S_ENABLE_PUSH, 2), PROTOCOL_ERROR),
    # An open stream's window, already raised, taken past 2^31-1 by a new initial window size.
    (frame(WINDOW_UPDATE, 0, 1, (100).to_bytes(4, "big")) + _settings(S_INITIAL_WINDOW_SIZE, 2**31 - 1),
     FLOW_CONTROL_ERROR),
    (frame(SETTINGS, 0, 0, b"\x00\x04\x00\x00\x01"), FRAME_SIZE_ERROR),  # 5 bytes
    (frame(SETTINGS, ACK, 0, bytes(6)), FRAME_SIZE_ERROR),
    (frame(SETTINGS, 0, 1, b""), PROTOCOL_ERROR),
    (frame(WINDOW_UPDATE, 0, 0, bytes(4)), PROTOCOL_ERROR),  # an increment of 0
    (frame(WINDOW_UPDATE, 0, 1, bytes(4)), PROTOCOL_ERROR),
    (frame(WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big")), FLOW_CONTROL_ERROR),  # 65535 + that
    (frame(WINDOW_UPDATE, 0, 1, (2**31 - 1).to_bytes(4, "big")), FLOW_CONTROL_ERROR),
    (frame(WINDOW_UPDATE, 0, 0, b"\x00\x01"), FRAME_SIZE_ERROR),
    (frame(RST_STREAM, 0, 1, b"\x00"), FRAME_SIZE_ERROR),  # 1 byte
    (frame(RST_STREAM, 0, 0, bytes(4)), PROTOCOL_ERROR),
    (frame(PING, 0, 0, b"abc"), FRAME_SIZE_ERROR),  # echoed once
    (frame(PING, 0, 1, bytes(8)), PROTOCOL_ERROR),
    (frame(GOAWAY, 0, 0, bytes(3)), FRAME_SIZE_ERROR),  # raised struct.error once
    (frame(PRIORITY, 0, 1, bytes(4)), FRAME_SIZE_ERROR),
    (frame(DATA, PADDED, 1, b""), PROTOCOL_ERROR),  # raised IndexError once
    (frame(DATA, PADDED, 1, b"\x05abc"), PROTOCOL_ERROR),  # padding past the payload
    (frame(HEADERS, PADDED | END_HEADERS, 1, b""), PROTOCOL_ERROR),
    (frame(HEADERS, PRIORITY_FLAG | END_HEADERS, 1, b"\x00\x00"), FRAME_SIZE_ERROR),
    (frame(DATA, 0, 0, b"abc"), PROTOCOL_ERROR),
    (frame(DATA, 0, 0, bytes(5000)), PROTOCOL_ERROR),  # large: passed on as it comes, checked first
    (frame(HEADERS, END_HEADERS, 0, b"\x82"), PROTOCOL_ERROR),
    # RFC 9113 5.1: stream states (stream 1 is open, 3 and up idle, even ones the server's).
    # Each of these was ignored once.
    (frame(DATA, 0, 3, b"x"), PROTOCOL_ERROR),
    (frame(DATA, 0, 3, bytes(5000)), PROTOCOL_ERROR),  # large: passed on as it comes, when cut
    (frame(DATA, 0, 2, b"x"), PROTOCOL_ERROR),
    (frame(WINDOW_UPDATE, 0, 3, (1).to_bytes(4, "big")), PROTOCOL_ERROR),
    (frame(RST_STREAM, 0, 3, bytes(4)), PROTOCOL_ERROR),  # 6.4
    (frame(HEADERS, END_HEADERS, 2, b"\x84"), PROTOCOL_ERROR),  # 5.1.1: a client's ids are odd
    (frame(PUSH_PROMISE, END_HEADERS, 1, (2).to_bytes(4, "big") + b"\x84"), PROTOCOL_ERROR),  # 8.4: clients don't push
    # half-closed (remote): after the client's END_STREAM only WINDOW_UPDATE, PRIORITY, RST_STREAM
    (frame(DATA, END_STREAM, 1, b"x") + frame(DATA, 0, 1, b"y"), STREAM_CLOSED),
    (frame(DATA, END_STREAM, 1, b"x") + frame(HEADERS, END_HEADERS | END_STREAM, 1, b"\x84"), STREAM_CLOSED),
    (frame(HEADERS, END_HEADERS, 1, b"\x84"), PROTOCOL_ERROR),  # 8.1: a second HEADERS must end the stream
    (frame(HEADERS, 0, 3, b"\x84") + frame(DATA, 0, 1, bytes(5000)), PROTOCOL_ERROR),  # 6.2: block cut
])
def test_a_malformed_frame_is_a_goaway_with_rfc_9113_s_code_never_an_exception(data: bytes, code: int) -> None:
    assert _goaway_for(data) == (True, code)
    assert _goaway_for(data, cut=1000) == (True, code)  # large DATA frames then take another path


def test_hpack_index_0_is_a_compression_error_however_full_the_table() -> None:
    fill = b"".join(b"\x40\x01" + bytes([97 + i % 26]) + b"\x00" for i in range(62))  # 62 fields, each indexed
    data = frame(HEADERS, END_HEADERS | END_STREAM, 3, fill) + frame(HEADERS, END_HEADERS | END_STREAM, 5, b"\x80")
    assert _goaway_for(data) == (True, COMPRESSION_ERROR)


def test_well_formed_control_frames_keep_the_connection() -> None:
    ok = (_settings(S_MAX_FRAME_SIZE, 2**24 - 1) + _settings(S_INITIAL_WINDOW_SIZE, 2**31 - 1)
          + frame(SETTINGS, ACK, 0) + frame(WINDOW_UPDATE, 0, 0, (2**31 - 1 - DEFAULT_WINDOW).to_bytes(4, "big"))
          + frame(PING, 0, 0, bytes(8)) + frame(PRIORITY, 0, 3, bytes(5)) + frame(0xFA, 0, 0, b"unknown type"))
    assert _goaway_for(ok) == (False, None)


def test_frames_on_closed_streams_are_ignored() -> None:
    """RFC 9113 5.1: frames a client sent before it saw a stream end are read and dropped: on a
    stream it reset, on one it skipped (opening 7 closes 3 and 5), and a half-closed stream's
    WINDOW_UPDATE, PRIORITY and RST_STREAM."""
    ok = (frame(DATA, END_STREAM, 1, b"x") + frame(WINDOW_UPDATE, 0, 1, (1).to_bytes(4, "big"))
          + frame(PRIORITY, 0, 1, bytes(5)) + frame(RST_STREAM, 0, 1, bytes(4))
          + frame(DATA, 0, 1, b"late") + frame(WINDOW_UPDATE, 0, 1, (1).to_bytes(4, "big"))
          + frame(HEADERS, END_HEADERS | END_STREAM, 7, b"\x84") + frame(DATA, 0, 3, b"x")
          + frame(RST_STREAM, 0, 5, bytes(4)) + frame(WINDOW_UPDATE, 0, 5, (1).to_bytes(4, "big")))
    assert _goaway_for(ok) == (False, None)


def test_a_call_the_client_ended_is_handed_on_once() -> None:
    """DATA after END_STREAM once reached the dispatcher as a second end of the same call (two
    upstream calls, two answers on one stream): now the connection ends with STREAM_CLOSED."""
    from tsfleet.router.wire.grpc_wire import GrpcServerConnection
    from tsfleet.router.wire.hpack_codec import encode

    class Dispatcher:
        stopping, ends = False, 0

        def opened(self, conn, call) -> None:
            pass

        def ended(self, conn, call) -> None:
            self.ends += 1

    async def main() -> tuple[int, bool, bytes]:
        dispatcher, wire = Dispatcher(), Wire()
        conn = GrpcServerConnection(dispatcher, set())
        conn.connection_made(wire)  # type: ignore[arg-type]
        conn.data_received(PREFACE + settings_frame({}) + frame(HEADERS, END_HEADERS, 1, encode([(b":path", b"/x")]))
                           + frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x00") + frame(DATA, END_STREAM, 1, b"again"))
        return dispatcher.ends, wire.closed, bytes(wire.written)

    ends, closed, written = asyncio.run(main())
    assert ends == 1 and closed and bytes([GOAWAY, 0]) + bytes(8) + STREAM_CLOSED.to_bytes(4, "big") in written


class BigFrames(Peer):
    frame_in = 1 << 20  # frames larger than the 65,535-byte windows it gives


def test_data_past_the_windows_given_is_a_flow_control_error() -> None:
    from tsfleet.router.wire.hpack_codec import encode

    async def main(body: int, chunk: int) -> tuple[bool, bytes]:
        peer = BigFrames(False)
        wire = Wire()
        peer.connection_made(wire)  # type: ignore[arg-type]
        data = PREFACE + settings_frame({}) + frame(HEADERS, END_HEADERS, 1, encode([(b":path", b"/x")])) \
            + frame(DATA, 0, 1, bytes(body))
        for i in range(0, len(data), chunk):  # whole, or cut as a socket may (the frame then streams)
            peer.data_received(data[i:i + chunk])
        peer._flush()
        return wire.closed, bytes(wire.written)

    for chunk in (1 << 20, 1000):
        closed, written = asyncio.run(main(DEFAULT_WINDOW + 1, chunk))
        assert closed and bytes([GOAWAY, 0]) + bytes(8) + FLOW_CONTROL_ERROR.to_bytes(4, "big") in written
        assert asyncio.run(main(DEFAULT_WINDOW, chunk))[0] is False


def test_data_on_streams_closed_keeps_no_bookkeeping() -> None:
    async def main() -> tuple[int, bool]:
        peer = Peer(False)
        wire = Wire()
        peer.connection_made(wire)  # type: ignore[arg-type]
        opened = frame(HEADERS, END_HEADERS | END_STREAM, 20_001, b"\x84")  # 1 to 19,999 are closed now (5.1.1)
        peer.data_received(PREFACE + settings_frame({}) + opened
                           + b"".join(frame(DATA, 0, s, b"x") for s in range(1, 20_001, 2)))
        return len(peer.stream_unacked), wire.closed

    assert asyncio.run(main()) == (0, False)


class Counting(Peer):
    def on_reset(self, stream: int, code: int) -> None:
        self.events.put_nowait(("reset", stream))


@pytest.mark.parametrize("one,allowed", [
    # "rapid reset": each stream opened, then reset
    (lambda i: frame(HEADERS, END_HEADERS, 2 * i + 1, b"\x84") + frame(RST_STREAM, 0, 2 * i + 1, bytes(4)), 500),
    (lambda i: frame(PING, 0, 0, bytes(8)), 1000),
    (lambda i: frame(SETTINGS, 0, 0, b""), 100),
])
def test_a_control_frame_flood_is_enhance_your_calm(one, allowed: int) -> None:
    async def main(n: int) -> tuple[bool, bytes]:
        peer = Counting(False)
        wire = Wire()
        peer.connection_made(wire)  # type: ignore[arg-type]
        peer.data_received(PREFACE + settings_frame({}) + b"".join(one(i) for i in range(n)))
        peer._flush()
        return wire.closed, bytes(wire.written)

    from tsfleet.router.wire.h2frames import ENHANCE_YOUR_CALM

    assert asyncio.run(main(allowed - 1))[0] is False  # the client's own SETTINGS counts too
    closed, written = asyncio.run(main(allowed + 1))
    assert closed and bytes([GOAWAY, 0]) + bytes(8) + ENHANCE_YOUR_CALM.to_bytes(4, "big") in written


def test_ping_acks_do_not_count_against_the_budget() -> None:
    async def main() -> bool:
        peer = Peer(False)
        wire = Wire()
        peer.connection_made(wire)  # type: ignore[arg-type]
        peer.data_received(PREFACE + settings_frame({}) + frame(PING, ACK, 0, bytes(8)) * 3000)
        return wire.closed

    assert asyncio.run(main()) is False
