"""gRPC answers passed on to clients: TorchServe's headers and trailers, with whose fault a
failure is made plain (grpc_wire.py: the clients' connection; grpc_upstream.py: TorchServe's)."""
from __future__ import annotations

from typing import Protocol

from grpc import StatusCode

from tsfleet.router.wire.grpc_wire import (GRPC_TYPE, NOT_FOUND_MARKS, STATUS_OK, WIRE_CODES, GrpcServerConnection,
                                           ServerCall, header, status_trailers)
from tsfleet.router.wire.h2frames import ENHANCE_YOUR_CALM
from tsfleet.router.wire.hpack_codec import Header

_INTERNAL, _NOT_FOUND = WIRE_CODES[StatusCode.INTERNAL], WIRE_CODES[StatusCode.NOT_FOUND]  # as sent: b"13", b"5"


class UpstreamAnswer(Protocol):
    """TorchServe's answer to a call (grpc_upstream.UpstreamCall), as passed on to the client."""

    headers: list[Header] | None
    trailers: list[Header]


def answer_headers(up: UpstreamAnswer, extra: list[Header]) -> tuple[list[Header], list[Header]]:
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
    if header(trailers, b"grpc-status") != _INTERNAL:  # every answer passes here: the common case first
        return trailers
    message = header(trailers, b"grpc-message") or b""
    if any(mark.encode() in message for mark in NOT_FOUND_MARKS):
        return [(name, _NOT_FOUND if name == b"grpc-status" else value) for name, value in trailers]
    return trailers


class Relay:
    """Passes an upstream answer on to the client as it comes (streams)."""

    def __init__(self, conn: GrpcServerConnection, call: ServerCall, extra: list[Header]):
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
        if self.conn.held(self.stream) > self.conn.max_held:
            # A client that stops reading a stream (at most its connection's max_held waits):
            # drop it rather than hold it without end (gRPC reads ENHANCE_YOUR_CALM as
            # RESOURCE_EXHAUSTED).
            self.conn.counters.held_bytes += 1
            self.conn.reset(self.stream, ENHANCE_YOUR_CALM)
            self.call.cancel()

    def fail(self, code: StatusCode, message: str) -> None:
        """End the answer with ``code`` and ``message`` (its headers first, if none went yet)."""
        head = None if self.started else [STATUS_OK, GRPC_TYPE] + self.extra
        self.started = True
        self.conn.send(self.stream, head, trailers=status_trailers(code, message))
