"""RFC 9113's conformance cases against a router process in front of a real TorchServe, over
raw sockets (hostile_peers.H2Client writes the frames by hand).

Each case asserts RFC 9113's answer (a GOAWAY and its code, or a gRPC status in trailers on a
connection that stays), then that REST and gRPC calls from everyone else are still answered
by the same process. test_router_hostile_peers.py has the HTTP/1.1 cases, and
SETTINGS_MAX_FRAME_SIZE out of range; tests/unit/test_http2_oracle.py compares the router
with h2 on generated frame sequences."""
from __future__ import annotations

import json
import time

import psutil
import pytest

from tests.integration.hostile_peers import (H2Client, frame, grpc_message, healthy, intent_request,  # noqa: F401
                                             router)
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.wire.h2frames import (COMPRESSION_ERROR, DATA, END_HEADERS, END_STREAM, FLOW_CONTROL_ERROR,
                                          FRAME_SIZE_ERROR, HEADERS, MAX_WINDOW, PREFACE, PROTOCOL_ERROR,
                                          S_INITIAL_WINDOW_SIZE, WINDOW_UPDATE, settings_frame)

pytestmark = pytest.mark.integration
OK, INVALID_ARGUMENT, RESOURCE_EXHAUSTED = b"0", b"3", b"8"


def serves_on(router, server, pid: int) -> None:
    healthy(router, server.keys.inference)
    assert router.proc.pid == pid


def test_no_client_preface_is_a_goaway(router, server) -> None:
    """RFC 9113 3.4: an invalid preface is a PROTOCOL_ERROR (here an HTTP/1.1 request)."""
    pid = router.proc.pid
    h2 = H2Client(router.grpc, hello=b"GET / HTTP/1.1\r\nHost: router\r\nConnection: Upgrade, HTTP2-Settings\r\n\r\n")
    assert h2.goaway() == PROTOCOL_ERROR
    serves_on(router, server, pid)


@pytest.mark.parametrize("frames,code", [
    (lambda h2, key: frame(DATA, 0, 0, b"data"), PROTOCOL_ERROR),  # 6.1
    (lambda h2, key: h2.call(2, key), PROTOCOL_ERROR),  # 5.1.1: a client's streams are odd
    (lambda h2, key: h2.call(1, key) + frame(DATA, 0, 1, bytes(h2.max_frame + 1))[:9], FRAME_SIZE_ERROR),  # 4.2
    (lambda h2, key: frame(HEADERS, END_HEADERS, 1, b"\x80"), COMPRESSION_ERROR),  # 4.3; RFC 7541 6.1
    (lambda h2, key: frame(HEADERS, END_HEADERS, 1, b"\xff\x49"), COMPRESSION_ERROR),  # in neither table
    (lambda h2, key: frame(WINDOW_UPDATE, 0, 0, MAX_WINDOW.to_bytes(4, "big")), FLOW_CONTROL_ERROR),  # 6.9.1
], ids=["data-on-stream-0", "headers-on-even-stream", "frame-over-max-frame-size", "hpack-index-0",
        "hpack-index-200", "connection-window-past-2^31-1"])
def test_a_connection_error_is_a_goaway_with_rfc_9113_s_code(router, server, frames, code) -> None:
    pid = router.proc.pid
    h2 = H2Client(router.grpc)
    h2.until(lambda f: f.type == WINDOW_UPDATE and not f.stream)  # the router's SETTINGS, then its window
    h2.send(frames(h2, server.keys.inference))
    assert h2.goaway() == code
    serves_on(router, server, pid)


def test_an_answer_to_a_zero_window_drains_whole_as_the_window_opens_and_the_router_does_not_spin(
        router, server) -> None:
    """INITIAL_WINDOW_SIZE 0: the answer waits for the client's WINDOW_UPDATEs of 5 bytes every
    0.1 s (RFC 9113 6.9), and arrives whole, never past the window given; the router waits
    without using more than a quarter of a core."""
    pid = router.proc.pid
    h2 = H2Client(router.grpc, hello=PREFACE + settings_frame({S_INITIAL_WINDOW_SIZE: 0}))
    h2.send(h2.call(1, server.keys.inference) + h2.data(1, grpc_message(intent_request()), end=True))
    head = h2.until(lambda f: f.stream == 1 and f.type == HEADERS)
    assert head and head[-1].type == HEADERS and dict(head[-1].headers)[b":status"] == b"200", head
    proc = psutil.Process(router.proc.pid)
    cpu, started = sum(proc.cpu_times()[:2]), time.monotonic()
    body, given, trailers = b"", 0, None
    while trailers is None and time.monotonic() - started < 60:
        h2.send(frame(WINDOW_UPDATE, 0, 1, (5).to_bytes(4, "big")))
        given += 5
        for got in h2.until(lambda f: False, timeout=0.1):
            if got.stream == 1 and got.type == DATA:
                body += got.payload
            elif got.stream == 1 and got.type == HEADERS:
                trailers = dict(got.headers)
        assert len(body) <= given, "the router sent past the window"
    wall, used = time.monotonic() - started, sum(proc.cpu_times()[:2]) - cpu
    assert trailers is not None and trailers.get(b"grpc-status") == OK, (trailers, body)
    assert body[0] == 0 and int.from_bytes(body[1:5], "big") == len(body) - 5
    assert json.loads(pb.PredictionResponse.FromString(body[5:]).prediction)["intent"] == "cancel"
    assert wall > 1 and used < 0.25 * wall, f"the router used {used:.2f} s of CPU in {wall:.2f} s while it waited"
    h2.close()
    serves_on(router, server, pid)


def test_a_4_gb_length_prefix_is_refused_and_the_connection_serves_on(router, server) -> None:
    """A message whose prefix says it is 4 GiB: the router refuses the call as the prefix
    arrives, with RESOURCE_EXHAUSTED (never INTERNAL or UNKNOWN), before reading more of it,
    and the same connection's next call is answered."""
    pid, key = router.proc.pid, server.keys.inference
    h2 = H2Client(router.grpc)
    h2.until(lambda f: f.type == WINDOW_UPDATE and not f.stream)  # the router's SETTINGS, then its window
    h2.send(h2.call(1, key) + h2.data(1, grpc_message(b"", declared=0xFFFFFFFF)))  # the prefix alone, no END_STREAM
    answer = list(h2.until(lambda f: f.stream == 1 and f.type == HEADERS and bool(f.flags & END_STREAM), timeout=10))
    trailers = [dict(f.headers) for f in answer if f.stream == 1 and f.type == HEADERS and f.flags & END_STREAM]
    assert trailers and trailers[-1][b"grpc-status"] == RESOURCE_EXHAUSTED, answer
    assert b"larger than the router" in trailers[-1][b"grpc-message"]
    h2.send(h2.call(3, key) + h2.data(3, grpc_message(intent_request()), end=True))
    frames, trailers = h2.answer(3)
    assert trailers.get(b"grpc-status") == OK, frames
    h2.close()
    serves_on(router, server, pid)


def test_a_message_cut_short_by_end_stream_is_invalid_argument(router, server) -> None:
    """END_STREAM after 3 of the 100 bytes the message's prefix declares."""
    pid = router.proc.pid
    h2 = H2Client(router.grpc)
    h2.send(h2.call(1, server.keys.inference) + h2.data(1, grpc_message(b"abc", declared=100), end=True))
    frames, trailers = h2.answer(1)
    assert trailers.get(b"grpc-status") == INVALID_ARGUMENT, frames
    assert b"declares 100" in trailers.get(b"grpc-message", b""), trailers
    h2.close()
    serves_on(router, server, pid)
