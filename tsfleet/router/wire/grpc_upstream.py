"""gRPC's upstream side: the router's multiplexed HTTP/2 connection to TorchServe's gRPC port.

A call is started with its headers and request bytes; its answer is collected (or passed on
as it comes to a sink, for streams) and ends a future, or a ``then`` callback for a
prediction (grpc_predict.py). The pool makes the connection again when it goes, and gives up
on calls past their deadline (deadlines.py).
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Protocol
from urllib.parse import unquote_to_bytes

from grpc import StatusCode

from tsfleet.router.wire.deadlines import Deadlines
from tsfleet.router.wire.grpc_wire import CODES, UpstreamGone, header
from tsfleet.router.wire.h2frames import CANCEL, Data
from tsfleet.router.wire.hpack_codec import Header
from tsfleet.router.wire.http2 import Http2Connection

log = logging.getLogger(__name__)
CONNECT_TIMEOUT_S = 5.0
_UNKNOWN = StatusCode.UNKNOWN


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

    def status(self) -> tuple[StatusCode, str]:
        """(grpc-status, grpc-message) of a finished call. A number no StatusCode has is
        UNKNOWN, as gRPC's own clients read it."""
        code = header(self.trailers, b"grpc-status")
        if code is None:
            http = header(self.headers or [], b":status") or b"?"
            return (StatusCode.UNKNOWN if http == b"200" else StatusCode.INTERNAL), \
                f"TorchServe answered HTTP {http.decode()} without a gRPC status"
        message = header(self.trailers, b"grpc-message") or b""
        # A look-up of the bytes as sent (cheaper than int() of them): this runs for every answer.
        return CODES.get(code, _UNKNOWN), unquote_to_bytes(message).decode(errors="replace") if message else ""


class UpstreamConnection(Http2Connection):
    client_side = True

    def __init__(self, pool: "GrpcUpstreamPool"):
        super().__init__()
        self.pool = pool
        self.calls: dict[int, UpstreamCall] = {}
        self.next_stream = 1
        self.draining = False

    def start(self, headers: list[Header], data: Data | None, end: bool, sink: Sink | None = None,
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


class GrpcUpstreamPool:
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
        self._deadlines.add_in((conn, stream), timeout)

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
