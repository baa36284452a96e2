"""HTTP/2's sending half: headers, data and trailers framed for the peer, each stream's
data held until the peer's windows let it go (http2.py: the connection, and what it reads)."""
from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

from tsfleet.router.wire import hpack_codec
from tsfleet.router.wire.h2frames import (CANCEL, CONTINUATION, DATA, END_HEADERS, END_STREAM, HEAD, HEADERS, LARGE,
                                          RST_STREAM, Data, frame)
from tsfleet.router.wire.hpack_codec import Header


class FlowControlledSender:
    """Sending for Http2Connection (a base class: the windows and writes are the connection's)."""

    closed: bool
    vectored: bool
    peer_frame: int
    conn_window: int
    windows: dict[int, int]
    blocked: dict[int, deque]

    if TYPE_CHECKING:  # Http2Connection's, declared for the type checker only
        def _write(self, data: bytes) -> None: ...

        def _write_pieces(self, pieces: list[bytes | memoryview]) -> None: ...

        def _forget(self, stream: int) -> None: ...

    def send(self, stream: int, headers: list[Header] | None = None, data: Data | None = None,
             trailers: list[Header] | None = None, end: bool = False) -> None:
        """Headers, then data, then trailers, any of them; the last one sent ends the stream
        when ``end`` (trailers always end it). One write when the windows allow. ``data``
        must not change afterwards: it is sent from a view of it, later in this loop turn."""
        if self.closed or stream not in self.windows:
            return  # the stream was reset or the connection is gone: nothing to say
        out: list[bytes | memoryview] = []
        queue = self.blocked.get(stream)
        if headers is not None:
            last = end and data is None and trailers is None
            if queue is None:
                self._header_frames(out, stream, headers, last)
            else:
                queue.append((HEADERS, headers, last))
        if data is not None:
            last = end and trailers is None
            if type(data) is list:
                for i, piece in enumerate(data):
                    queue = self._send_data(out, stream, queue, piece, last and i == len(data) - 1)
            else:
                queue = self._send_data(out, stream, queue, data, last)
        if trailers is not None:
            if queue is None:
                self._header_frames(out, stream, trailers, True)
            else:
                queue.append((HEADERS, trailers, True))
            end = True
        if out:
            self._write_pieces(out)
        if end and queue is None:
            self._forget(stream)

    def _send_data(self, out: list[bytes | memoryview], stream: int, queue: deque | None,
                   data: bytes | memoryview, last: bool) -> deque | None:
        """Frames for ``data`` while the windows allow; the rest waits in the stream's queue."""
        if queue is None:
            rest = self._data_frames(out, stream, data, last)
            if rest is None:
                return None
            data, queue = rest, self.blocked.setdefault(stream, deque())
        queue.append((DATA, data, last))
        return queue

    def held(self, stream: int) -> int:
        """Bytes of ``stream`` waiting for the peer's window."""
        return sum(len(payload) for kind, payload, _ in self.blocked.get(stream, ()) if kind == DATA)

    def reset(self, stream: int, code: int = CANCEL) -> None:
        """End a stream the peer has not finished with (the caller knows it is open)."""
        if not self.closed:
            self._write(frame(RST_STREAM, 0, stream, code.to_bytes(4, "big")))
        self._forget(stream)

    def _header_frames(self, out: list[bytes | memoryview], stream: int, headers: list[Header], end: bool) -> None:
        block = hpack_codec.encode(headers)
        step = self.peer_frame
        flags = END_STREAM if end else 0
        if len(block) <= step:
            out.append(frame(HEADERS, flags | END_HEADERS, stream, block))
            return
        out.append(frame(HEADERS, flags, stream, block[:step]))
        for i in range(step, len(block), step):
            out.append(frame(CONTINUATION, END_HEADERS if i + step >= len(block) else 0, stream, block[i:i + step]))

    def _data_frames(self, out: list[bytes | memoryview], stream: int, data: bytes | memoryview,
                     end: bool) -> bytes | memoryview | None:
        """Frames for as much of ``data`` as the windows allow, as a header and a view of the
        payload each; returns what is left (None: all sent)."""
        window = min(self.conn_window, self.windows[stream])
        pos, size, step = 0, len(data), self.peer_frame
        view = data if size <= step or isinstance(data, memoryview) else memoryview(data)
        while pos < size and window > 0:
            n = min(step, window, size - pos)
            out.append(HEAD.pack(n << 8 | DATA, END_STREAM if end and pos + n == size else 0, stream))
            out.append(view if n == size else view[pos:pos + n])
            if n > LARGE:
                self.vectored = True
            pos += n
            window -= n
            self.conn_window -= n
            self.windows[stream] -= n
        if pos < size:
            return view[pos:]
        if size == 0:
            out.append(frame(DATA, END_STREAM if end else 0, stream))
        return None

    def _unblock(self) -> None:
        if not self.blocked:
            return
        out: list[bytes | memoryview] = []
        for stream in list(self.blocked):
            queue = self.blocked[stream]
            while queue:
                kind, payload, end = queue[0]
                if kind == HEADERS:
                    self._header_frames(out, stream, payload, end)
                else:
                    rest = self._data_frames(out, stream, payload, end)
                    if rest is not None:
                        queue[0] = (DATA, rest, end)
                        break
                queue.popleft()
                if end:
                    self._forget(stream)
                    break
            else:
                self.blocked.pop(stream, None)
            if self.conn_window <= 0:
                break
        if out:
            self._write_pieces(out)
