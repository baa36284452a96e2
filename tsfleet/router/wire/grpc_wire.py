"""gRPC over the router's HTTP/2: the client-facing connection, gRPC's message framing and
status trailers, and answers passed on to clients (grpc_upstream.py: the connection to
TorchServe).

A call is a stream: HEADERS (``:path`` names the method), DATA carrying length-prefixed
messages, and the answer's HEADERS, DATA and trailers (``grpc-status``, ``grpc-message``).
"""
from __future__ import annotations

import asyncio
import gzip
import zlib
from typing import TYPE_CHECKING, Protocol, TypeVar

from google.protobuf.message import DecodeError, Message

from tsfleet.router.wire.h2frames import ENHANCE_YOUR_CALM, NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM, ProtocolError
from tsfleet.router.wire.hpack_codec import Header
from tsfleet.router.wire.http2 import Http2Connection

if TYPE_CHECKING:
    from tsfleet.router.wire.grpc_upstream import UpstreamCall, UpstreamConnection

OK, UNKNOWN, INVALID_ARGUMENT, NOT_FOUND = 0, 2, 3, 5
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14
M = TypeVar("M", bound=Message)
# TorchServe's exception names for a model or version it does not have, which it answers INTERNAL.
NOT_FOUND_MARKS = ("ModelNotFoundException", "ModelVersionNotFoundException")
STATUS_OK = (b":status", b"200")
GRPC_TYPE = (b"content-type", b"application/grpc")


# ------------------------------------------------------------------ messages
def frame_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def split_messages(buffer: bytearray) -> list[tuple[int, bytes]]:
    """Take the whole (compressed flag, payload) messages off the front of ``buffer``."""
    out, pos = [], 0
    while len(buffer) - pos >= 5:
        size = int.from_bytes(buffer[pos + 1:pos + 5], "big")
        if len(buffer) - pos - 5 < size:
            break
        out.append((buffer[pos], bytes(buffer[pos + 5:pos + 5 + size])))
        pos += 5 + size
    del buffer[:pos]
    return out


def decompress(payload: bytes | memoryview, encoding: bytes) -> bytes | None:
    """A compressed message's bytes; None for an encoding the router cannot read."""
    if encoding == b"gzip":
        return gzip.decompress(payload)
    if encoding == b"deflate":
        return zlib.decompress(payload)
    return None


def read_message(kind: type[M], headers: list[Header], flag: int, payload: bytes | memoryview) -> M | None:
    """A client's message of protobuf type ``kind``, decompressed as its call's grpc-encoding
    says; None when the router cannot read it."""
    if flag:
        payload = decompress(payload, header(headers, b"grpc-encoding") or b"identity")
        if payload is None:
            return None
    try:
        return kind.FromString(payload)
    except DecodeError:
        return None


def _percent(message: str) -> bytes:
    """gRPC's grpc-message encoding: printable ASCII as is, other bytes and '%' as %XX."""
    return b"".join(bytes((b,)) if 0x20 <= b <= 0x7E and b != 0x25 else b"%%%02X" % b
                    for b in message.encode())


def status_trailers(code: int, message: str) -> list[Header]:
    return [(b"grpc-status", str(code).encode()), (b"grpc-message", _percent(message))]


def header(headers: list[Header], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


class UpstreamGone(ConnectionError):
    """No whole answer came back: refused, reset, connection lost or cancelled."""


# ------------------------------------------------------------------ client side
class Dispatcher(Protocol):
    """What a client connection hands its calls to (the router)."""

    stopping: bool

    def opened(self, conn: "ServerConnection", call: "ServerCall") -> None: ...

    def ended(self, conn: "ServerConnection", call: "ServerCall") -> None: ...


class ServerCall:
    """One call from a client: its headers, its request bytes so far, whether it was cancelled."""

    __slots__ = ("id", "headers", "path", "parts", "size", "cancelled", "queue", "upstream")

    def __init__(self, stream: int, headers: list[Header]):
        self.id, self.headers = stream, headers
        self.path = header(headers, b":path") or b""
        # The request's bytes as they came (views of what was read), joined once when read:
        # appending each piece to one buffer would copy a large request as it grows.
        self.parts: list[bytes | memoryview] = []
        self.size = 0
        self.cancelled = False
        self.queue: asyncio.Queue | None = None  # set by a dispatcher that wants DATA as it comes
        self.upstream: tuple[UpstreamConnection, int] | None = None  # to reset it if the client goes

    @property
    def body(self) -> bytes:
        """The request's bytes so far."""
        if len(self.parts) != 1 or not isinstance(self.parts[0], bytes):
            self.parts = [b"".join(self.parts)]
        return self.parts[0]

    def cancel(self) -> None:
        self.cancelled = True
        if self.upstream is not None:
            conn, stream = self.upstream
            conn.fail(stream, UpstreamGone("the client cancelled the call"), reset=True)
        if self.queue is not None:
            self.queue.put_nowait(None)


class ServerConnection(Http2Connection):
    """A client's connection: each new stream is a call handed to the dispatcher."""

    # A request read whole (all but sequences) may be this big: TorchServe enforces its own
    # max_request_size below it, so the router must not undercut it.
    max_request = 64 * 2**20
    # What all of one connection's calls may hold of their requests at once: the windows
    # alone let a client send 64 MiB, credited back as read (12 streams x 16 MiB held 192 MiB).
    max_buffered = 2 * max_request

    def __init__(self, dispatcher: Dispatcher, connections: set["ServerConnection"]):
        super().__init__()
        self.dispatcher, self.connections = dispatcher, connections
        self.calls: dict[int, ServerCall] = {}
        self.last_stream = 0
        self.buffered = 0  # request bytes the calls in ``calls`` hold

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.connections.add(self)

    def on_headers(self, stream: int, headers: list[Header], end: bool) -> None:
        call = self.calls.get(stream)
        if call is None:
            if stream % 2 == 0 or stream <= self.last_stream:
                raise ProtocolError(PROTOCOL_ERROR, f"stream {stream} cannot be opened by a client")
            self.last_stream = stream
            self.open_stream(stream)
            # Past the MAX_CONCURRENT_STREAMS it advertised, a stream is refused (RFC 9113
            # 5.1.2): 3,000 were held once.
            if self.dispatcher.stopping or len(self.calls) >= self.streams_in:
                self.reset(stream, REFUSED_STREAM)
                return
            call = self.calls[stream] = ServerCall(stream, headers)
            self.dispatcher.opened(self, call)
        if end:
            self._end(call)

    def on_data(self, stream: int, data: bytes | memoryview, end: bool) -> None:
        call = self.calls.get(stream)
        if call is None:
            return  # a call already answered or reset
        if call.queue is not None:
            call.queue.put_nowait(data)
        else:
            call.parts.append(data)
            call.size += len(data)
            self.buffered += len(data)
            if call.size > self.max_request + 5 or self.buffered > self.max_buffered:  # 5: the message's prefix
                self._drop(stream)
                why = f"request larger than the router's {self.max_request >> 20} MiB" \
                    if call.size > self.max_request + 5 else \
                    f"this connection's requests hold over {self.max_buffered >> 20} MiB of the router's memory"
                self.send(stream, [STATUS_OK, GRPC_TYPE], trailers=status_trailers(RESOURCE_EXHAUSTED, why))
                self.reset(stream, NO_ERROR)  # read no more of it
                return
        if end:
            self._end(call)

    def _end(self, call: ServerCall) -> None:
        if call.queue is not None:
            call.queue.put_nowait(None)
        else:
            self.dispatcher.ended(self, call)

    def finish(self, call: ServerCall) -> None:
        """The call has had its answer (or the client gave up on it)."""
        self._drop(call.id)

    def _drop(self, stream: int) -> ServerCall | None:
        call = self.calls.pop(stream, None)
        if call is not None:
            self.buffered -= call.size
        return call

    def on_reset(self, stream: int, code: int) -> None:
        call = self._drop(stream)
        if call is not None:
            call.cancel()

    def on_closed(self, reason: str) -> None:
        self.connections.discard(self)
        for call in list(self.calls.values()):
            call.cancel()
        self.calls.clear()
        self.buffered = 0


# ------------------------------------------------------------------ answers
def answer_headers(up: UpstreamCall, extra: list[Header]) -> tuple[list[Header], list[Header]]:
    """(headers, trailers) for the client; a trailers-only answer is split in two so the
    version still comes back as initial metadata."""
    assert up.headers is not None
    if up.trailers is up.headers:
        return [STATUS_OK, GRPC_TYPE] + extra, _whose_fault([h for h in up.trailers if h[0][0] != 58 and h[0] != b"content-type"])
    return [h for h in up.headers if h[0] == b":status" or h[0][0] != 58] + extra, \
        _whose_fault([h for h in up.trailers if h[0][0] != 58])


def _whose_fault(trailers: list[Header]) -> list[Header]:
    """TorchServe's INTERNAL for a model or version it does not have is the client's
    NOT_FOUND: a client must not read it as a server fault (nor retry it)."""
    if header(trailers, b"grpc-status") != b"13":  # every answer passes here: the common case first
        return trailers
    message = header(trailers, b"grpc-message") or b""
    if any(mark.encode() in message for mark in NOT_FOUND_MARKS):
        return [(name, b"5" if name == b"grpc-status" else value) for name, value in trailers]
    return trailers


class Relay:
    """Passes an upstream answer on to the client as it comes (streams)."""

    max_held = 64 * 2**20  # of an answer, waiting for the client to read it

    def __init__(self, conn: ServerConnection, call: ServerCall, extra: list[Header]):
        self.conn, self.call, self.stream, self.extra, self.started = conn, call, call.id, extra, False

    def on_headers(self, headers: list[Header], end: bool) -> None:
        if self.started:
            self.conn.send(self.stream, trailers=_whose_fault([h for h in headers if h[0][0] != 58]))
            return
        self.started = True
        if end:
            self.conn.send(self.stream, [STATUS_OK, GRPC_TYPE] + self.extra,
                           trailers=_whose_fault([h for h in headers if h[0][0] != 58 and h[0] != b"content-type"]))
        else:
            self.conn.send(self.stream, [h for h in headers if h[0] == b":status" or h[0][0] != 58] + self.extra)

    def on_data(self, data: bytes | memoryview, end: bool) -> None:
        self.started = True
        self.conn.send(self.stream, data=data, end=end)
        if self.conn.held(self.stream) > self.max_held:
            # A client that stops reading a stream: drop it rather than hold it without end
            # (gRPC reads ENHANCE_YOUR_CALM as RESOURCE_EXHAUSTED).
            self.conn.reset(self.stream, ENHANCE_YOUR_CALM)
            self.call.cancel()

    def fail(self, code: int, message: str) -> None:
        head = None if self.started else [STATUS_OK, GRPC_TYPE] + self.extra
        self.started = True
        self.conn.send(self.stream, head, trailers=status_trailers(code, message))
