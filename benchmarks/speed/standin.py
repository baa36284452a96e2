"""A stand-in for TorchServe's inference port that does no model work, so that the router's
own cost per request can be measured (benchmarks/speed/hop.py).

It answers every request with a small JSON body under TorchServe's usual headers. With
``batch_ms`` 0 it answers at once; otherwise as TorchServe on a GPU does: the first waiting
request starts a ``batch_ms`` timer, and when it ends every waiting request is answered at
once. That burst is what makes the router's cost per answer add up (each answer waits for
the ones before it).

``python -m benchmarks.speed.standin PORT BATCH_MS``: prints "ready" once it listens.
"""
from __future__ import annotations

import asyncio
import sys
import uuid

BODY = b'{"label": "triangle", "score": 0.97}'
HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nx-request-id: %s\r\nPragma: no-cache\r\n"
        b"Cache-Control: no-cache; no-store, must-revalidate, private\r\nExpires: Thu, 01 Jan 1970 00:00:00 UTC\r\n"
        b"content-length: %d\r\nconnection: keep-alive\r\n\r\n")


class StandIn:
    """Answers requests, at once or in batches of whatever is waiting every ``batch_s``."""

    def __init__(self, batch_s: float):
        self.batch_s = batch_s
        self.waiting: list[asyncio.Transport] = []
        self.timer: asyncio.TimerHandle | None = None

    def answer(self, transport: asyncio.Transport) -> None:
        if self.batch_s <= 0:
            transport.write(self._answer())
            return
        self.waiting.append(transport)
        if self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(self.batch_s, self._flush)

    def _flush(self) -> None:
        self.timer = None
        waiting, self.waiting = self.waiting, []
        for transport in waiting:
            if not transport.is_closing():
                transport.write(self._answer())

    @staticmethod
    def _answer() -> bytes:
        return HEAD % (str(uuid.uuid4()).encode(), len(BODY)) + BODY


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
            self.server.answer(self.transport)  # type: ignore[arg-type]


async def serve(port: int, batch_ms: float) -> None:
    server = StandIn(batch_ms / 1000)
    listener = await asyncio.get_running_loop().create_server(lambda: _Connection(server), "127.0.0.1", port,
                                                              backlog=1024)
    print("ready", flush=True)
    async with listener:
        await listener.serve_forever()


def main(argv: list[str]) -> None:
    port, batch_ms = int(argv[0]), float(argv[1])
    try:
        import uvloop  # as fast as the router's own loop, so the stand-in is never the bottleneck
    except ImportError:
        asyncio.run(serve(port, batch_ms))
    else:
        uvloop.run(serve(port, batch_ms))


if __name__ == "__main__":
    main(sys.argv[1:])
