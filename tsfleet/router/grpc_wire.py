"""gRPC over the router's HTTP/2: the client-facing connection, the upstream connection
pool, and gRPC's message framing and status trailers.

A call is a stream: HEADERS (``:path`` names the method), DATA carrying length-prefixed
messages, and the answer's HEADERS, DATA and trailers (``grpc-status``, ``grpc-message``).
"""
from __future__ import annotations

import asyncio
import gzip
import logging
import zlib
from typing import Callable, Protocol
from urllib.parse import unquote_to_bytes

from tsfleet.router.deadlines import Deadlines
from tsfleet.router.http2 import (CANCEL, ENHANCE_YOUR_CALM, NO_ERROR, PROTOCOL_ERROR, REFUSED_STREAM,
                                  Http2Connection, ProtocolError)
from tsfleet.router.hpack_codec import Header

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0
OK, UNKNOWN, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 0, 2, 8, 12, 13, 14
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


# ------------------------------------------------------------------ client side
class Dispatcher(Protocol):
    """What a client connection hands its calls to (the router)."""

    stopping: bool

    def opened(self, conn: "ServerConnection", call: "ServerCall") -> None: ...

    def ended(self, conn: "ServerConnection", call: "ServerCall") -> None: ...


class ServerCall:
    """One call from a client: its headers, its request bytes so far, whether it was cancelled."""

    __slots__ = ("id", "headers", "path", "body", "cancelled", "queue", "upstream")

    def __init__(self, stream: int, headers: list[Header]):
        self.id, self.headers = stream, headers
        self.path = header(headers, b":path") or b""
        self.body = bytearray()
        self.cancelled = False
        self.queue: asyncio.Queue | None = None  # set by a dispatcher that wants DATA as it comes
        self.upstream: tuple[UpstreamConnection, int] | None = None  # to reset it if the client goes

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

    def __init__(self, dispatcher: Dispatcher, connections: set["ServerConnection"]):
        super().__init__()
        self.dispatcher, self.connections = dispatcher, connections
        self.calls: dict[int, ServerCall] = {}
        self.last_stream = 0

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
            if self.dispatcher.stopping:
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
            call.body += data
            if len(call.body) > self.max_request + 5:  # the message and its 5-byte prefix
                self.calls.pop(stream)
                self.send(stream, [STATUS_OK, GRPC_TYPE], trailers=status_trailers(
                    RESOURCE_EXHAUSTED, f"request larger than the router's {self.max_request >> 20} MiB"))
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
        self.calls.pop(call.id, None)

    def on_reset(self, stream: int, code: int) -> None:
        call = self.calls.pop(stream, None)
        if call is not None:
            call.cancel()

    def on_closed(self, reason: str) -> None:
        self.connections.discard(self)
        for call in list(self.calls.values()):
            call.cancel()
        self.calls.clear()


# ------------------------------------------------------------------ upstream side
class UpstreamGone(ConnectionError):
    """No whole answer came back: refused, reset, connection lost or cancelled."""


class Sink(Protocol):
    """Takes an upstream answer as it comes (a relayed stream)."""

    def on_headers(self, headers: list[Header], end: bool) -> None: ...

    def on_data(self, data: bytes | memoryview, end: bool) -> None: ...


# then(call, None) once the answer is whole, or then(call, error): called from the event loop.
Then = Callable[["UpstreamCall", "UpstreamGone | None"], None]


class UpstreamCall:
    """One call to TorchServe: its answer, collected, or passed on to a sink as it comes.
    ``done`` is settled when it ends, unless it was started with a ``then`` callback instead
    (a prediction: no future per call, see grpc_predict.py)."""

    __slots__ = ("id", "headers", "body", "trailers", "done", "sink", "then")

    def __init__(self, stream: int, done: asyncio.Future | None, sink: Sink | None, then: Then | None = None):
        self.id, self.done, self.sink, self.then = stream, done, sink, then
        self.headers: list[Header] | None = None
        self.trailers: list[Header] = []
        self.body = bytearray()

    def status(self) -> tuple[int, str]:
        """(grpc-status, grpc-message) of a finished call."""
        code = header(self.trailers, b"grpc-status")
        if code is None:
            http = header(self.headers or [], b":status") or b"?"
            return (UNKNOWN if http == b"200" else INTERNAL), f"TorchServe answered HTTP {http.decode()} without a gRPC status"
        message = header(self.trailers, b"grpc-message") or b""
        return int(code), unquote_to_bytes(message).decode(errors="replace") if message else ""


class UpstreamConnection(Http2Connection):
    client_side = True

    def __init__(self, pool: "UpstreamPool"):
        super().__init__()
        self.pool = pool
        self.calls: dict[int, UpstreamCall] = {}
        self.next_stream = 1
        self.draining = False

    def start(self, headers: list[Header], data: bytes | None, end: bool, sink: Sink | None = None,
              then: Then | None = None) -> UpstreamCall:
        """Open a call; its end settles the returned call's ``done``, or is passed to ``then``."""
        stream, self.next_stream = self.next_stream, self.next_stream + 2
        if self.next_stream >= 1 << 31:  # stream ids are spent: the next call opens a new connection
            self.draining = True
            self.pool.forget(self)
        done = None if then is not None else self.loop.create_future()
        call = self.calls[stream] = UpstreamCall(stream, done, sink, then)
        self.open_stream(stream)
        self.send(stream, headers, data, end=end)
        return call

    def on_headers(self, stream: int, headers: list[Header], end: bool) -> None:
        call = self.calls.get(stream)
        if call is None:
            return
        if call.headers is None:
            call.headers = headers
            if end:  # trailers-only: the status is in the only HEADERS
                call.trailers = headers
        else:
            call.trailers = headers
        if call.sink is not None:
            call.sink.on_headers(headers, end)
        if end:
            self._done(call)

    def on_data(self, stream: int, data: bytes | memoryview, end: bool) -> None:
        call = self.calls.get(stream)
        if call is None:
            return
        if call.sink is not None:
            call.sink.on_data(data, end)
        else:
            call.body += data
        if end:
            self._done(call)

    def _done(self, call: UpstreamCall) -> None:
        self.calls.pop(call.id, None)
        self._forget(call.id)  # an answer that ends early: what was left to send is moot
        self._settle(call, None)
        if self.draining and not self.calls:
            self.close()

    def fail(self, stream: int, error: UpstreamGone, reset: bool = False) -> None:
        call = self.calls.pop(stream, None)
        if call is not None:
            if reset:
                self.reset(stream, CANCEL)
            self._settle(call, error)

    @staticmethod
    def _settle(call: UpstreamCall, error: UpstreamGone | None) -> None:
        if call.then is not None:
            then, call.then = call.then, None
            try:
                then(call, error)
            except Exception:  # noqa: BLE001 - a faulty callback must not take the connection down
                log.exception("router: error while handing on a gRPC answer")
        elif call.done is not None and not call.done.done():
            call.done.set_result(None) if error is None else call.done.set_exception(error)

    def on_reset(self, stream: int, code: int) -> None:
        self.fail(stream, UpstreamGone(f"TorchServe reset the call (HTTP/2 error {code})"))

    def on_goaway(self, last_stream: int, code: int, message: str) -> None:
        self.draining = True
        self.pool.forget(self)
        for stream in [s for s in self.calls if s > last_stream]:
            self.fail(stream, UpstreamGone(f"TorchServe is closing the connection{': ' + message if message else ''}"))
        if not self.calls:
            self.close()

    def on_closed(self, reason: str) -> None:
        self.pool.forget(self)
        for stream in list(self.calls):
            self.fail(stream, UpstreamGone(f"connection to TorchServe lost ({reason})"))


class UpstreamPool:
    """One multiplexed HTTP/2 connection to TorchServe's gRPC port, made again when it goes."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.authority = f"{host}:{port}".encode()
        self.conn: UpstreamConnection | None = None
        self._connecting: asyncio.Task | None = None
        self._deadlines: Deadlines[tuple[UpstreamConnection, int]] = Deadlines(
            lambda call: call[0].fail(call[1], UpstreamGone("no answer within the attempt's deadline"), reset=True))

    def expire_after(self, conn: UpstreamConnection, stream: int, timeout: float) -> None:
        """Fail (and reset) call ``stream`` of ``conn`` unless ``settled`` within ``timeout`` s."""
        self._deadlines.add((conn, stream), asyncio.get_running_loop().time() + timeout)

    def settled(self, conn: UpstreamConnection, stream: int) -> None:
        self._deadlines.discard((conn, stream))

    def ready(self) -> UpstreamConnection | None:
        """The open connection, if there is one (else ``connection`` makes one)."""
        conn = self.conn
        return conn if conn is not None and not conn.closed and not conn.draining else None

    async def connection(self) -> UpstreamConnection:
        conn = self.ready()
        if conn is not None:
            return conn
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port), CONNECT_TIMEOUT_S)
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamGone(str(exc) or type(exc).__name__) from exc
        finally:
            self._connecting = None
        self.conn = conn
        return conn

    def forget(self, conn: UpstreamConnection) -> None:
        if self.conn is conn:
            self.conn = None

    def close(self) -> None:
        self._deadlines.close()
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ------------------------------------------------------------------ answers
def answer_headers(up: UpstreamCall, extra: list[Header]) -> tuple[list[Header], list[Header]]:
    """(headers, trailers) for the client; a trailers-only answer is split in two so the
    version still comes back as initial metadata."""
    assert up.headers is not None
    if up.trailers is up.headers:
        return [STATUS_OK, GRPC_TYPE] + extra, [h for h in up.trailers if h[0][0] != 58 and h[0] != b"content-type"]
    return [h for h in up.headers if h[0] == b":status" or h[0][0] != 58] + extra, \
        [h for h in up.trailers if h[0][0] != 58]


class Relay:
    """Passes an upstream answer on to the client as it comes (streams)."""

    max_held = 64 * 2**20  # of an answer, waiting for the client to read it

    def __init__(self, conn: ServerConnection, call: ServerCall, extra: list[Header]):
        self.conn, self.call, self.stream, self.extra, self.started = conn, call, call.id, extra, False

    def on_headers(self, headers: list[Header], end: bool) -> None:
        if self.started:
            self.conn.send(self.stream, trailers=[h for h in headers if h[0][0] != 58])
            return
        self.started = True
        if end:
            self.conn.send(self.stream, [STATUS_OK, GRPC_TYPE] + self.extra,
                           trailers=[h for h in headers if h[0][0] != 58 and h[0] != b"content-type"])
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
