"""What the hostile-peer suites share (test_router_hostile_peers.py: HTTP/1.1 and gRPC
messages; test_router_hostile_h2.py: HTTP/2 frames): a router process in front of the
session's TorchServe, raw sockets, a client that writes HTTP/2 frames by hand, and the check
that everyone else is still served by the same process."""
from __future__ import annotations

import json
import select
import socket
import struct
import time
from typing import Callable, Iterator, NamedTuple

import grpc
import hpack
import pytest
import requests

from benchmarks.harness import RouterProcessRunner
from tests.integration.conftest import ROOT
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc
from tsfleet.router.wire.h2frames import (CONTINUATION, DATA, DEFAULT_FRAME, DEFAULT_WINDOW, END_HEADERS, END_STREAM,
                                          GOAWAY, HEADERS, PREFACE, RST_STREAM, S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE,
                                          SETTINGS, WINDOW_UPDATE, settings_frame)

PREDICTIONS = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"


@pytest.fixture(scope="module")
def router(server, tmp_path_factory) -> Iterator[RouterProcessRunner]:
    runner = RouterProcessRunner(ROOT / "fleet.yaml", server.config, tmp_path_factory.mktemp("router"))
    yield runner
    runner.stop()


def raw_exchange(url: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection and read until the router closes it (or 10 s)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except TimeoutError:
            pass
        return b"".join(chunks)


def healthy(router: RouterProcessRunner, key: str) -> None:
    """A REST and a gRPC call through the router are answered, by the same router process."""
    resp = requests.post(router.url + "/predictions/intent-classifier", json={"text": "cancel my plan"},
                         headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert resp.status_code == 200 and resp.json()["intent"] == "cancel", resp.text[:200]
    with grpc.insecure_channel(router.grpc) as channel:
        reply = pb_grpc.InferenceAPIsServiceStub(channel).Predictions(
            pb.PredictionsRequest(model_name="intent-classifier", input={"data": b'{"text": "cancel my plan"}'}),
            metadata=(("authorization", f"Bearer {key}"),), timeout=10)
    assert json.loads(reply.prediction)["intent"] == "cancel"
    assert router.proc.poll() is None


# --------------------------------------------------------------------------- HTTP/2 by hand
class Frame(NamedTuple):
    type: int
    flags: int
    stream: int
    payload: bytes
    headers: list[tuple[bytes, bytes]] | None = None  # a header block's, decoded


def frame(ftype: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    """Any frame, as given: no check of its length, stream or flags."""
    return struct.pack(">IBI", len(payload) << 8 | ftype, flags, stream) + payload


def grpc_message(request: pb.PredictionsRequest | bytes, declared: int | None = None) -> bytes:
    payload = request if isinstance(request, bytes) else request.SerializeToString()
    return b"\x00" + struct.pack(">I", len(payload) if declared is None else declared) + payload


def intent_request(text: str = "cancel my plan") -> pb.PredictionsRequest:
    return pb.PredictionsRequest(model_name="intent-classifier", input={"data": json.dumps({"text": text}).encode()})


class H2Client:
    """One HTTP/2 connection to the router's gRPC port, written frame by frame: what a
    conforming or hostile client would send, byte for byte; what the router sends back is read
    as it comes, its windows and SETTINGS followed."""

    def __init__(self, addr: str, hello: bytes | None = None):
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buffer, self.closed = b"", False
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self.block: list[Frame] = []  # a header block's frames until its END_HEADERS
        self.max_frame, self.initial_window, self.conn_window = DEFAULT_FRAME, DEFAULT_WINDOW, DEFAULT_WINDOW
        self.windows: dict[int, int] = {}  # per stream: what the router lets this client send
        self.sock.sendall(PREFACE + settings_frame({}) if hello is None else hello)

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def call(self, stream: int, key: str, path: str = PREDICTIONS, end: bool = False) -> bytes:
        """The HEADERS frame of a gRPC call (its window noted as the router gave it)."""
        block = self.encoder.encode([(":method", "POST"), (":scheme", "http"), (":path", path),
                                     (":authority", "router"), ("content-type", "application/grpc"),
                                     ("te", "trailers"), ("authorization", f"Bearer {key}")])
        self.windows[stream] = self.initial_window
        return frame(HEADERS, END_HEADERS | (END_STREAM if end else 0), stream, block)

    def data(self, stream: int, payload: bytes, end: bool = False) -> bytes:
        self.windows[stream] = self.windows.get(stream, self.initial_window) - len(payload)
        self.conn_window -= len(payload)
        return frame(DATA, END_STREAM if end else 0, stream, payload)

    # ------------------------------------------------------------ reading
    def read(self, timeout: float) -> Frame | None:
        """The next frame (a header block's last), or None when none comes within ``timeout``
        or the router closed the connection (``closed``)."""
        deadline = time.monotonic() + timeout
        while not self.closed:
            if len(self.buffer) >= 9:
                length = int.from_bytes(self.buffer[:3], "big")
                if len(self.buffer) >= 9 + length:
                    got = self._take(length)
                    if got is not None:
                        return got
                    continue
            if not select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
                return None
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.closed = True
            self.buffer += chunk
        return None

    def _take(self, length: int) -> Frame | None:
        ftype, flags, stream = self.buffer[3], self.buffer[4], int.from_bytes(self.buffer[5:9], "big") & 0x7FFFFFFF
        got = Frame(ftype, flags, stream, self.buffer[9:9 + length])
        self.buffer = self.buffer[9 + length:]
        if ftype == SETTINGS and not flags & 1:
            for i in range(0, length, 6):
                key, value = struct.unpack(">HI", got.payload[i:i + 6])
                if key == S_MAX_FRAME_SIZE:
                    self.max_frame = value
                elif key == S_INITIAL_WINDOW_SIZE:
                    self.windows = {s: w + value - self.initial_window for s, w in self.windows.items()}
                    self.initial_window = value
        elif ftype == WINDOW_UPDATE:
            increment = int.from_bytes(got.payload, "big") & 0x7FFFFFFF
            if stream:
                self.windows[stream] = self.windows.get(stream, self.initial_window) + increment
            else:
                self.conn_window += increment
        elif ftype in (HEADERS, CONTINUATION):
            self.block.append(got)
            if not flags & END_HEADERS:
                return None
            first, block = self.block[0], b"".join(f.payload for f in self.block)
            self.block = []
            return first._replace(flags=first.flags | END_HEADERS, headers=self.decoder.decode(block, raw=True))
        return got

    def until(self, done: Callable[[Frame], bool], timeout: float = 15) -> list[Frame]:
        """Frames read until one that is ``done`` (the last), the connection's end, or ``timeout``."""
        deadline, frames = time.monotonic() + timeout, []
        while (got := self.read(max(0.0, deadline - time.monotonic()))) is not None:
            frames.append(got)
            if done(got):
                break
        return frames

    def goaway(self) -> int | None:
        """The error code of the GOAWAY the router ends the connection with (None: none came),
        once it has closed the connection."""
        codes = [struct.unpack(">I", f.payload[4:8])[0] for f in self.until(lambda f: False) if f.type == GOAWAY]
        assert self.closed, "the router kept the connection"
        return codes[-1] if codes else None

    def answer(self, stream: int, timeout: float = 30) -> tuple[list[Frame], dict[bytes, bytes]]:
        """The frames of ``stream``'s answer and its trailers (empty: reset, or none came)."""
        frames = [f for f in self.until(lambda f: f.stream == stream and (f.type == RST_STREAM or (
            f.type == HEADERS and f.flags & END_STREAM)), timeout) if f.stream == stream]
        last = frames[-1] if frames else None
        return frames, dict(last.headers) if last and last.type == HEADERS and last.headers else {}
