"""gRPC over the router's HTTP/2: the client-facing connection, gRPC's message framing and
status trailers (grpc_answers.py: answers passed on to clients; grpc_upstream.py: the
connection to TorchServe).

A call is a stream: HEADERS (``:path`` names the method), DATA carrying length-prefixed
messages, and the answer's HEADERS, DATA and trailers (``grpc-status``, ``grpc-message``).
"""
from __future__ import annotations

import asyncio
from typing import Protocol, TypeVar

from google.protobuf.message import DecodeError, Message
from grpc import StatusCode

from tsfleet.router.wire import hpack_codec
from tsfleet.router.wire.grpc_inflate import MessageTooLarge, NotEncoded, decompress
from tsfleet.router.wire.h2frames import (ENHANCE_YOUR_CALM, NO_ERROR, PING, PROTOCOL_ERROR, REFUSED_STREAM, RST_STREAM,
                                          SETTINGS, Floods, ProtocolError)
from tsfleet.router.wire.hpack_codec import Header, TooLarge
from tsfleet.router.wire.http2 import Http2Connection
from tsfleet.router.wire.limits import DEFAULT_LIMITS, LimitCounters, RouterLimits, size

# grpc-status on the wire is the code's number (StatusCode.X.value[0]) in decimal; both ways
# are table look-ups made once here (an enum member's .value is a Python-level property).
WIRE_CODES = {code: str(code.value[0]).encode() for code in StatusCode}
CODES = {wire: code for code, wire in WIRE_CODES.items()}
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


def read_message(kind: type[M], headers: list[Header], flag: int, payload: bytes | memoryview,
                 limit: int = DEFAULT_LIMITS.message_bytes) -> M | None:
    """A client's message of protobuf type ``kind``, decompressed as its call's grpc-encoding
    says (to at most ``limit`` bytes: MessageTooLarge past it, NotEncoded for bytes not in
    that encoding); None when the router cannot read it."""
    if flag:
        payload = decompress(payload, header(headers, b"grpc-encoding") or b"identity", limit)
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


def status_trailers(code: StatusCode, message: str) -> list[Header]:
    """The trailers of an answer the router makes itself: ``code`` and ``message``."""
    return [(b"grpc-status", WIRE_CODES[code]), (b"grpc-message", _percent(message))]


def header(headers: list[Header], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


class UpstreamGone(ConnectionError):
    """No whole answer came back: refused, reset, connection lost or cancelled."""


def _declared(parts: list[bytes | memoryview]) -> int:
    """The length a request's first message prefix declares (its first 5 bytes are in ``parts``)."""
    first = parts[0]
    if len(first) < 5:  # the prefix came in pieces (rare)
        first = b"".join(bytes(part[:5]) for part in parts[:5])
    return int.from_bytes(first[1:5], "big")


class UpstreamSide(Protocol):
    """Where a client's call went upstream (grpc_upstream.UpstreamConnection), to reset it."""

    def fail(self, stream: int, error: UpstreamGone, reset: bool = False) -> None: ...


# ------------------------------------------------------------------ client side
class Dispatcher(Protocol):
    """What a client connection hands its calls to (the router)."""

    stopping: bool

    def opened(self, conn: "GrpcServerConnection", call: "ServerCall") -> None: ...

    def ended(self, conn: "GrpcServerConnection", call: "ServerCall") -> None: ...


class ServerCall:
    """One call from a client: its headers, its request bytes so far, whether it was cancelled."""

    __slots__ = ("id", "headers", "path", "parts", "size", "cancelled", "queue", "upstream", "since", "plain")

    def __init__(self, stream: int, headers: list[Header]):
        self.id, self.headers = stream, headers
        self.path = header(headers, b":path") or b""
        # The request's bytes as they came (views of what was read), joined once when read:
        # appending each piece to one buffer would copy a large request as it grows.
        self.parts: list[bytes | memoryview] = []
        self.size = 0
        self.cancelled = False
        self.queue: asyncio.Queue | None = None  # set by a dispatcher that wants DATA as it comes
        self.upstream: tuple[UpstreamSide, int] | None = None  # to reset it if the client goes
        self.since: float | None = None  # when its HEADERS came, while a request read whole is not yet whole
        self.plain: bytes | None = None  # its one message decompressed, when it came compressed (_inflated)

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


_UNCOUNTED = LimitCounters()  # where a connection made without a router's counters counts
_FLOODS = {RST_STREAM: "resets_per_second", PING: "pings_per_second", SETTINGS: "settings_per_second"}


class GrpcServerConnection(Http2Connection):
    """A client's connection: each new stream is a call handed to the dispatcher.

    Its limits are ``limits``'s (router.limits, limits.py), read once here; without them the
    class attributes below, their defaults (tests make these small). Each limit that fires
    is counted in ``counters``."""

    # A request read whole (all but sequences) may be this big: TorchServe enforces its own
    # max_request_size below it, so the router must not undercut it.
    max_request = DEFAULT_LIMITS.message_bytes
    # What all of one connection's calls may hold of their requests at once: the windows
    # alone let a client send 64 MiB, credited back as read (12 streams x 16 MiB held 192 MiB).
    max_buffered = DEFAULT_LIMITS.buffered_bytes
    # Of an answer, waiting for the client to read it (Relay); and of all the connection's
    # answers and ACKs written and not read (a client that opened its windows wide).
    max_held = max_unread = DEFAULT_LIMITS.held_bytes
    max_connections = DEFAULT_LIMITS.connections
    head_timeout, body_timeout = DEFAULT_LIMITS.head_timeout_s, DEFAULT_LIMITS.body_timeout_s

    def __init__(self, dispatcher: Dispatcher, connections: set["GrpcServerConnection"],
                 limits: RouterLimits | None = None, counters: LimitCounters = _UNCOUNTED):
        super().__init__()
        if limits is not None:
            self.header_list_in, self.streams_in = limits.header_list_bytes, limits.streams_per_connection
            self.max_request, self.max_buffered, self.max_held = limits.message_bytes, limits.buffered_bytes, \
                limits.held_bytes
            self.max_unread = limits.held_bytes
            self.max_connections = limits.connections
            self.head_timeout, self.body_timeout = limits.head_timeout_s, limits.body_timeout_s
            self.floods = Floods({RST_STREAM: limits.resets_per_second, PING: limits.pings_per_second,
                                  SETTINGS: limits.settings_per_second})
        # A header list past the limit is decoded to its end (HPACK's table stays the
        # client's) and refuses its own stream, not the connection's others (on_headers).
        self.decoder = hpack_codec.Decoder(max_list=self.header_list_in, whole=True)
        self.dispatcher, self.connections, self.counters = dispatcher, connections, counters
        self.calls: dict[int, ServerCall] = {}
        self.last_stream = 0
        self.buffered = 0  # request bytes the calls in ``calls`` hold
        self.opened = 0.0
        self.head_since: tuple[object, float] | None = None  # (a header block not whole, when first seen)
        self.deadlines: asyncio.TimerHandle | None = None
        # The dispatcher's own per-connection note (grpc_front.py: what it made of the last
        # header list this connection's calls sent), kept with the connection, gone with it.
        self.remembered: tuple | None = None

    def unread(self) -> None:
        self.counters.held_bytes += 1
        super().unread()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.connections) >= self.max_connections:
            # Past the cap, closed at accept with nothing said: grpcio reports UNAVAILABLE at
            # once and reconnects with its backoff. (A preface and a GOAWAY made it reconnect
            # at once, dozens of times a second, while its call waited for its deadline.)
            self.closed = True
            self.counters.connections += 1
            transport.close()
            return
        super().connection_made(transport)
        self.connections.add(self)
        self.opened = self.loop.time()
        self.deadlines = self.loop.call_later(self._period(), self._check_deadlines)

    def _period(self) -> float:
        return min(10.0, self.head_timeout / 4, self.body_timeout / 4)

    def _check_deadlines(self) -> None:
        """A connection whose preface, or a header block of which, is not whole within the head
        deadline is closed (its stream cannot be refused alone: HPACK's state is mid-block);
        a call read whole that is not whole within the body deadline of its HEADERS gets
        DEADLINE_EXCEEDED. Looked at every quarter deadline (at most 10 s), as http1's are."""
        if self.closed:
            return
        now = self.loop.time()
        block = self.continuing
        if block is None:
            self.head_since = None
        elif self.head_since is None or self.head_since[0] is not block:
            self.head_since = (block, now)
        if (self.preface_pending and now - self.opened > self.head_timeout) or \
                (self.head_since is not None and now - self.head_since[1] > self.head_timeout):
            self.counters.head_timeout_s += 1
            self.close(ENHANCE_YOUR_CALM, f"no whole request head within {self.head_timeout:g} s",
                       last_stream=self.last_stream)
            return
        late = [call for call in self.calls.values() if call.since is not None and now - call.since > self.body_timeout]
        for call in late:
            self._drop(call.id)
            self.counters.body_timeout_s += 1
            self.send(call.id, [STATUS_OK, GRPC_TYPE], trailers=status_trailers(
                StatusCode.DEADLINE_EXCEEDED, f"the request was not received whole within {self.body_timeout:g} s"))
            self.reset(call.id, NO_ERROR)  # read no more of it
            call.cancel()
        self.deadlines = self.loop.call_later(self._period(), self._check_deadlines)

    def close(self, code: int = NO_ERROR, message: str = "", last_stream: int = 0) -> None:
        if code == ENHANCE_YOUR_CALM and not self.closed:  # a limit http2.py enforces: counted here
            if self.floods.tripped is not None:
                self.counters.hit(_FLOODS[self.floods.tripped])
            elif message.startswith("header block over"):
                self.counters.header_list_bytes += 1
            # The GOAWAY names every stream the client opened, the one past the limit too: with
            # 0, grpcio read it as "none was seen" and sent the same call again on a new
            # connection (a second GOAWAY; RFC 9113 6.8 lets the sender name streams it "might
            # have" acted on).
            last_stream = max(last_stream, self.last_stream, getattr(self, "peer_high", 0))
        super().close(code, message, last_stream)

    def on_headers(self, stream: int, headers: list[Header], end: bool) -> None:
        if headers.__class__ is TooLarge:
            self._too_large(stream, end)
            return
        call = self.calls.get(stream)
        if call is None:
            if stream % 2 == 0 or stream <= self.last_stream:
                raise ProtocolError(PROTOCOL_ERROR, f"stream {stream} cannot be opened by a client")
            self.last_stream = stream
            self.open_stream(stream)
            # Past the MAX_CONCURRENT_STREAMS it advertised, a stream is refused (RFC 9113
            # 5.1.2): 3,000 were held once.
            if self.dispatcher.stopping or len(self.calls) >= self.streams_in:
                if not self.dispatcher.stopping:
                    self.counters.streams_per_connection += 1
                self.reset(stream, REFUSED_STREAM)
                return
            call = self.calls[stream] = ServerCall(stream, headers)
            self.dispatcher.opened(self, call)
            if not end and call.queue is None:  # read whole: its body deadline runs
                call.since = self.loop.time()
        if end:
            self._end(call)

    def _too_large(self, stream: int, end: bool) -> None:
        """A header list past the limit, decoded whole: its stream alone is refused with
        RESOURCE_EXHAUSTED (RFC 9113 10.5.1; a GOAWAY here failed every call on the
        connection, and grpcio reported UNAVAILABLE)."""
        self.counters.header_list_bytes += 1
        call = self._drop(stream)
        if call is not None:  # trailers past the limit, on a call under way
            call.cancel()
            self.reset(stream, ENHANCE_YOUR_CALM)  # gRPC reads it as RESOURCE_EXHAUSTED
            return
        if stream % 2 == 0 or stream <= self.last_stream:
            raise ProtocolError(PROTOCOL_ERROR, f"stream {stream} cannot be opened by a client")
        self.last_stream = stream
        self.open_stream(stream)
        self.send(stream, [STATUS_OK, GRPC_TYPE], trailers=status_trailers(
            StatusCode.RESOURCE_EXHAUSTED, f"metadata over the router's {self.header_list_in}-byte header list limit"))
        if not end:
            self.reset(stream, NO_ERROR)  # read no more of it

    def on_data(self, stream: int, data: bytes | memoryview, end: bool) -> None:
        call = self.calls.get(stream)
        if call is None:
            return  # a call already answered or reset
        if call.queue is not None:
            call.queue.put_nowait(data)
        else:
            n = len(data)
            call.parts.append(data)
            got = call.size = call.size + n
            self.buffered += n
            # Over the limit, or (once, as its prefix arrives) declaring more: a 4 GB prefix is
            # refused at once, not after max_request bytes of it were read. 5: the prefix.
            if got > self.max_request + 5 or self.buffered > self.max_buffered or (got - n < 5 <= got and (
                    int.from_bytes(data[1:5], "big") if got == n else _declared(call.parts)) > self.max_request):
                self._refuse(stream, got > self.max_request + 5 or (got - n < 5 <= got and (
                    int.from_bytes(data[1:5], "big") if got == n else _declared(call.parts)) > self.max_request))
                return
        if end:
            if call.queue is not None:  # _end, inline: once per call
                call.queue.put_nowait(None)
            else:
                call.since = None  # whole: no deadline of its reading left
                first = call.parts[0] if call.parts else b""
                if call.size > 5 and (not first or first[0]) and not self._inflated(call):  # compressed: rare
                    return
                self.dispatcher.ended(self, call)

    def _inflated(self, call: ServerCall) -> bool:
        """Whether ``call`` may go on: a compressed message is decompressed here, at most
        max_request bytes of it (kept as ``call.plain``), as the limit holds for what the
        router reads, not what was sent; past it RESOURCE_EXHAUSTED (counted as message_bytes),
        bytes not in the call's grpc-encoding INVALID_ARGUMENT. A body that is not one message,
        or an encoding the router cannot read, is left to the dispatcher to judge."""
        data = call.body
        if not data[0] or len(data) != 5 + int.from_bytes(data[1:5], "big"):
            return True
        try:
            call.plain = decompress(memoryview(data)[5:], header(call.headers, b"grpc-encoding") or b"identity",
                                    self.max_request)
            return True
        except (MessageTooLarge, NotEncoded) as exc:
            self._drop(call.id)
            if isinstance(exc, MessageTooLarge):
                self.counters.message_bytes += 1
            code = StatusCode.RESOURCE_EXHAUSTED if isinstance(exc, MessageTooLarge) else StatusCode.INVALID_ARGUMENT
            self.send(call.id, [STATUS_OK, GRPC_TYPE], trailers=status_trailers(code, str(exc)))
            return False

    def _refuse(self, stream: int, over: bool) -> None:
        """A request past max_request (``over``), or past what the connection may buffer."""
        self._drop(stream)
        self.counters.hit("message_bytes" if over else "buffered_bytes")
        why = f"request larger than the router's {size(self.max_request)}" if over else \
            f"this connection's requests hold over {self.max_buffered >> 20} MiB of the router's memory"
        self.send(stream, [STATUS_OK, GRPC_TYPE], trailers=status_trailers(StatusCode.RESOURCE_EXHAUSTED, why))
        self.reset(stream, NO_ERROR)  # read no more of it

    def _end(self, call: ServerCall) -> None:
        if call.queue is not None:
            call.queue.put_nowait(None)
        else:
            call.since = None  # whole: no deadline of its reading left
            if call.size > 5 and not self._inflated(call):
                return
            self.dispatcher.ended(self, call)

    def finish(self, call: ServerCall) -> None:
        """The call has had its answer (or the client gave up on it)."""
        if self.calls.pop(call.id, None) is not None:  # _drop, inline: once per call
            self.buffered -= call.size

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
        if self.deadlines is not None:
            self.deadlines.cancel()
        self.connections.discard(self)
        for call in list(self.calls.values()):
            call.cancel()
        self.calls.clear()
        self.buffered = 0
