"""A stand-in for TorchServe's inference ports that does no model work, so that the router's
own cost per request can be measured (benchmarks/speed/hop.py).

It answers every REST request with a small JSON body under TorchServe's usual headers, and
every gRPC call (over the router's own HTTP/2, tsfleet/router/wire/grpc_wire.py) with a small
PredictionResponse. With ``batch_ms`` 0 it answers at once; otherwise as TorchServe on a
GPU does: the first waiting request starts a ``batch_ms`` timer, and when it ends every
waiting request is answered at once. That burst is what makes the router's cost per
answer add up (each answer waits for the ones before it).

``python -m benchmarks.speed.standin PORT BATCH_MS [GRPC_PORT]``: prints "ready" once it
listens.
"""
from __future__ import annotations

import asyncio
import sys
import uuid
from typing import Callable

from grpc import StatusCode

from tsfleet.router.wire.grpc_wire import GRPC_TYPE, STATUS_OK, GrpcServerConnection, ServerCall, frame_message, \
    status_trailers
from tsfleet.router.proto import inference_pb2 as pb

BODY = b'{"label": "triangle", "score": 0.97}'
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: %s\r\nPragma: no-cache\r\n"
        b"Cache-Control: no-cache; no-store, must-revalidate, private\r\nExpires: Thu, 01 Jan 1970 00:00:00 UTC\r\n"
        b"content-length: %d\r\nconnection: keep-alive\r\n\r\n")


class StandIn:
    """Answers requests, at once or in batches of whatever is waiting every ``batch_s``."""

    stopping = False  # as a gRPC dispatcher: never refuses a call
    grpc_answer = frame_message(pb.PredictionResponse(prediction=BODY).SerializeToString())
    grpc_trailers = status_trailers(StatusCode.OK, "")  # read-only once sent: one list for every answer

    def __init__(self, batch_s: float):
        self.batch_s = batch_s
        self.waiting: list[Callable[[], None]] = []
        self.timer: asyncio.TimerHandle | None = None

    def answer(self, send: Callable[[], None]) -> None:
        if self.batch_s <= 0:
            send()
            return
        self.waiting.append(send)
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.batch_s, self._flush)

    def _flush(self) -> None:
        self.timer = None
        waiting, self.waiting = self.waiting, []
        for send in waiting:
            send()

    def answer_rest(self, transport: asyncio.Transport) -> None:
        def send() -> None:
            if not transport.is_closing():
                transport.write(HEAD % (str(uuid.uuid4()).encode(), len(BODY)) + BODY)
        self.answer(send)

    # gRPC: a Dispatcher of grpc_wire.GrpcServerConnection
    def opened(self, conn: GrpcServerConnection, call: ServerCall) -> None:
        pass

    def ended(self, conn: GrpcServerConnection, call: ServerCall) -> None:
        def send() -> None:
            if not conn.closed and not call.cancelled:
                conn.send(call.id, [STATUS_OK, GRPC_TYPE], self.grpc_answer, self.grpc_trailers)
            conn.finish(call)
        self.answer(send)


class _Connection(asyncio.Protocol):
    def __init__(self, server: StandIn):
        self.server, self.buf = server, bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head = bytes(self.buf[:end]).lower()
            at = head.find(b"\r\ncontent-length:")
            length = int(head[at + 17:].split(b"\r\n", 1)[0]) if at >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            del self.buf[:end + 4 + length]
            self.server.answer_rest(self.transport)  # type: ignore[arg-type]


async def serve(port: int, batch_ms: float, grpc_port: int | None = None) -> None:
    server = StandIn(batch_ms / 1000)
    loop = asyncio.get_running_loop()
    listeners = [await loop.create_server(lambda: _Connection(server), "127.0.0.1", port, backlog=1024)]
    if grpc_port is not None:
        calls: set[GrpcServerConnection] = set()
        listeners.append(await loop.create_server(lambda: GrpcServerConnection(server, calls), "127.0.0.1", grpc_port,
                                                  backlog=1024))
    print("ready", flush=True)
    await asyncio.gather(*(listener.serve_forever() for listener in listeners))


def main(argv: list[str]) -> None:
    port, batch_ms = int(argv[0]), float(argv[1])
    grpc_port = int(argv[2]) if len(argv) > 2 else None
    try:
        import uvloop  # as fast as the router's own loop, so the stand-in is never the bottleneck
    except ImportError:
        asyncio.run(serve(port, batch_ms, grpc_port))
    else:
        uvloop.run(serve(port, batch_ms, grpc_port))


if __name__ == "__main__":
    main(sys.argv[1:])
