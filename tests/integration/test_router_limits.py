"""fleet.yaml's router.limits, through a `tsfleet route` of two processes in front of a real
TorchServe: each limit provoked a known number of times gets its answer (REST status, the gRPC
code a grpcio client reports), /metrics counts exactly that many (every process's added up),
and nothing else fired; a REST and a gRPC call are answered after each.

The limits are made small here so that the tests are fast; what each protects and its
default: docs/router.md's "Router limits" table."""
from __future__ import annotations

import json
import socket
import time
from typing import Iterator

import grpc
import pytest
import requests
import yaml
from google.protobuf import empty_pb2

from benchmarks.harness import RouterProcessRunner
from tests.integration.conftest import ROOT
from tests.integration.test_router_hostile_peers import healthy
from tests.prometheus_text import samples
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc
from tsfleet.router.wire.h2frames import (ENHANCE_YOUR_CALM, GOAWAY, HEADERS, PREFACE, REFUSED_STREAM, RST_STREAM,
                                          frame, settings_frame)
from tsfleet.router.wire.hpack_codec import encode

pytestmark = pytest.mark.integration

CAP = 6  # connections per process, REST and gRPC each
PROCESSES = 2
LIMITS = {"connections": CAP, "streams_per_connection": 4, "head_bytes": 4096, "header_lines": 20,
          "body_bytes": 1 << 20, "header_list_bytes": 8192, "head_timeout_s": 1, "body_timeout_s": 1.5,
          "idle_timeout_s": 120, "resets_per_second": 20}  # message_bytes: its default, 64 MiB
LOCAL = [("grpc.use_local_subchannel_pool", 1)]  # a channel with a connection of its own
PREDICTIONS = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"


@pytest.fixture(scope="module")
def router(server, tmp_path_factory) -> Iterator[RouterProcessRunner]:
    workdir = tmp_path_factory.mktemp("router-limits")
    doc = yaml.safe_load((ROOT / "fleet.yaml").read_text())
    for model in doc["models"].values():  # the manifest lives elsewhere: its handlers where they are
        model["handler"] = str(ROOT / model["handler"])
    doc["router"] = {"limits": LIMITS}
    manifest = workdir / "fleet.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    runner = RouterProcessRunner(manifest, server.config, workdir, processes=PROCESSES)
    yield runner
    runner.stop()


def hits(router: RouterProcessRunner) -> dict[tuple[str, str], int]:
    text = requests.get(router.url + "/metrics", timeout=10).text
    return {(dict(labels)["limit"], dict(labels)["front"]): int(n)
            for labels, n in samples(text, "tsfleet_router_limit_hits_total").items()}


class Counted:
    """Asserts that exactly ``expected`` limit hits (``{(limit, front): n}``) happened inside
    the block, every process's counted, and no other limit fired."""

    def __init__(self, router: RouterProcessRunner):
        self.router = router

    def __enter__(self) -> "Counted":
        self.before = hits(self.router)
        assert len(self.before) == 19, self.before  # every limit of each front is exported, from 0
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def expect(self, expected: dict[tuple[str, str], int]) -> None:
        # A front process tells the leader every 0.2 s (and before it asks for /metrics).
        deadline, delta = time.monotonic() + 5, {}
        while time.monotonic() < deadline:
            after = hits(self.router)
            delta = {key: after[key] - self.before[key] for key in after if after[key] != self.before[key]}
            if delta == expected:
                break
            time.sleep(0.2)
        time.sleep(0.5)  # and no more come
        after = hits(self.router)
        assert {key: after[key] - self.before[key] for key in after if after[key] != self.before[key]} == expected


def rest_exchange(router: RouterProcessRunner, data: bytes, timeout: float = 10) -> tuple[int, bytes]:
    host, port = router.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def grpc_address(router: RouterProcessRunner) -> tuple[str, int]:
    host, port = router.grpc.split(":")
    return host, int(port)


# ------------------------------------------------------------------ connections per process
def test_connections_past_each_process_cap_are_refused_and_counted(router, server) -> None:
    host, port = router.url.removeprefix("http://").split(":")
    ghost, gport = grpc_address(router)
    held: list[socket.socket] = []
    refused = {"rest": 0, "grpc": 0}
    try:
        with Counted(router) as counted:
            # REST: keep-alive connections answered 200, until both processes hold CAP (the
            # kernel spreads connections over the processes as it likes); past that, 503.
            accepted = 0
            while accepted < CAP * PROCESSES:
                sock = socket.create_connection((host, int(port)), timeout=10)
                sock.sendall(b"GET /livez HTTP/1.1\r\nHost: r\r\n\r\n")
                answer = sock.recv(65536)
                if answer.startswith(b"HTTP/1.1 200"):
                    accepted += 1
                    held.append(sock)
                else:
                    assert answer.startswith(b"HTTP/1.1 503") and b"too many connections" in answer, answer[:200]
                    refused["rest"] += 1
                    sock.close()
                assert refused["rest"] < 200
            assert requests.get(router.url + "/livez", timeout=10).status_code == 503
            refused["rest"] += 1
            # gRPC: a connection taken gets the router's SETTINGS; one past the cap is closed at once.
            accepted = 0
            while accepted < CAP * PROCESSES:
                sock = socket.create_connection((ghost, gport), timeout=10)
                sock.sendall(PREFACE + settings_frame({}))
                try:
                    first = sock.recv(65536)
                except ConnectionResetError:
                    first = b""
                if first:
                    accepted += 1
                    held.append(sock)
                else:
                    refused["grpc"] += 1
                    sock.close()
                assert refused["grpc"] < 200
            # A grpcio client is told UNAVAILABLE at once (one connection tried, then its
            # backoff), not left waiting for its deadline.
            with grpc.insecure_channel(router.grpc, options=LOCAL) as channel:
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as err:
                    pb_grpc.InferenceAPIsServiceStub(channel).Ping(empty_pb2.Empty(), timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 5
            refused["grpc"] += 1
            for sock in held:  # /metrics needs a connection too
                sock.close()
            held.clear()
            counted.expect({("connections", "rest"): refused["rest"], ("connections", "grpc"): refused["grpc"]})
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while True:  # until the processes have seen the held connections closed
        try:
            healthy(router, server.keys.inference)
            break
        except (AssertionError, requests.RequestException, grpc.RpcError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# ------------------------------------------------------------------ REST heads, bodies, deadlines
def test_rest_heads_bodies_and_deadlines_get_their_status_and_are_counted(router, server) -> None:
    key = server.keys.inference.encode()
    with Counted(router) as counted:
        for _ in range(3):
            status, body = rest_exchange(router, b"GET /ping HTTP/1.1\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n")
            assert status == 431 and b"request head too large" in body
        for _ in range(2):
            status, body = rest_exchange(router, b"GET /ping HTTP/1.1\r\n" + b"X-A: b\r\n" * 25 + b"\r\n")
            assert status == 431 and b"more than 20 header lines" in body
        for _ in range(4):
            status, body = rest_exchange(router, b"POST /predictions/intent-classifier HTTP/1.1\r\nAuthorization: Bearer "
                                         + key + b"\r\nContent-Length: %d\r\n\r\n" % ((1 << 20) + 1))
            assert status == 413 and b"1048576-byte limit" in body
        # A head sent a byte a second, and a body that stops half way: 408 at their deadlines.
        started = time.monotonic()
        status, body = rest_exchange(router, b"GET /ping HTTP/1.1\r\nX-Slow: a")
        assert status == 408 and b"head not received whole within 1 s" in body
        status, body = rest_exchange(router, b"POST /predictions/intent-classifier HTTP/1.1\r\nContent-Length: 20\r\n"
                                     b"Authorization: Bearer " + key + b"\r\n\r\n{\"text\": ")
        assert status == 408 and b"not received whole within 1.5 s" in body
        assert time.monotonic() - started < 6
        counted.expect({("head_bytes", "rest"): 3, ("header_lines", "rest"): 2, ("body_bytes", "rest"): 4,
                        ("head_timeout_s", "rest"): 1, ("body_timeout_s", "rest"): 1})
    healthy(router, server.keys.inference)


# ------------------------------------------------------------------ gRPC sizes
def test_a_grpc_message_over_what_torchserve_takes_is_resource_exhausted_not_unavailable(router, server) -> None:
    """TorchServe's gRPC server resets a message over its max_request_size (10 MiB) with CANCEL
    and no status, which came back through the router as UNAVAILABLE (and was sent again): the
    router refuses it itself, under its own 64 MiB as over it. grpcio sends any size by default."""
    auth = (("authorization", f"Bearer {server.keys.inference}"),)
    with Counted(router) as counted:
        with grpc.insecure_channel(router.grpc) as channel:
            stub = pb_grpc.InferenceAPIsServiceStub(channel)
            for size in (70_000_000, 60_000_000, (10 << 20) + 1000):
                request = pb.PredictionsRequest(model_name="image-classifier", input={"data": bytes(size)})
                with pytest.raises(grpc.RpcError) as err:
                    stub.Predictions(request, metadata=auth, timeout=60)
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (size, err.value.code(), err.value.details())
                assert "larger than the router's 10,239 KiB" in err.value.details()
            # Under it, TorchServe reads it: its handler's own limit for an image (8 MiB) answers,
            # in the body as handlers do over gRPC.
            request = pb.PredictionsRequest(model_name="image-classifier", input={"data": bytes(9 << 20)})
            reply = stub.Predictions(request, metadata=auth, timeout=60)
            assert json.loads(reply.prediction)["code"] == 413, reply.prediction[:300]
        counted.expect({("message_bytes", "grpc"): 3})
    healthy(router, server.keys.inference)


def test_grpc_metadata_over_the_header_list_limit_is_resource_exhausted_for_that_call_alone(router, server) -> None:
    auth = ("authorization", f"Bearer {server.keys.inference}")
    request = pb.PredictionsRequest(model_name="intent-classifier", input={"data": b'{"text": "cancel my plan"}'})
    with Counted(router) as counted:
        with grpc.insecure_channel(router.grpc) as channel:
            stub = pb_grpc.InferenceAPIsServiceStub(channel)
            for _ in range(3):
                big = stub.Predictions.future(request, metadata=(auth, ("x-big", "v" * 12_000)), timeout=10)
                beside = stub.Predictions.future(request, metadata=(auth,), timeout=10)  # same connection
                with pytest.raises(grpc.RpcError) as err:
                    big.result()
                assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.value.code(), err.value.details())
                assert "8192-byte header list limit" in err.value.details()
                assert b"cancel" in beside.result().prediction
            # Over 4 times the limit as sent, the block is refused before it is all held: that
            # costs the connection (RFC 9113 4.3), and grpcio says UNAVAILABLE.
            with pytest.raises(grpc.RpcError) as err:
                stub.Predictions(request, metadata=(auth, ("x-big", "v" * 40_000)), timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "header block over" in err.value.details()
        counted.expect({("header_list_bytes", "grpc"): 4})
    healthy(router, server.keys.inference)


# ------------------------------------------------------------------ gRPC deadlines and floods
def _raw_grpc(router: RouterProcessRunner, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(grpc_address(router), timeout=wait) as sock:
        sock.sendall(data)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return got


def _goaway(got: bytes) -> int | None:
    at = got.find(bytes([GOAWAY, 0]) + bytes(4))
    return int.from_bytes(got[at + 10:at + 14], "big") if at >= 0 else None


def _call(stream: int, end: bool = False) -> bytes:
    block = encode([(b":method", b"POST"), (b":scheme", b"http"), (b":path", PREDICTIONS.encode()),
                    (b":authority", b"r"), (b"content-type", b"application/grpc"), (b"te", b"trailers")])
    return frame(HEADERS, 0x4 | (0x1 if end else 0), stream, block)


def test_grpc_deadlines_streams_and_resets_get_their_answer_and_are_counted(router, server) -> None:
    auth = (("authorization", f"Bearer {server.keys.inference}"),)
    request = pb.PredictionsRequest(model_name="intent-classifier", input={"data": b'{"text": "hi"}'})

    def one_then_nothing() -> Iterator[bytes]:
        yield request.SerializeToString()
        time.sleep(8)

    with Counted(router) as counted:
        with grpc.insecure_channel(router.grpc) as channel:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:  # a call whose request never ends
                channel.stream_unary(PREDICTIONS)(one_then_nothing(), metadata=auth, timeout=10)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, (err.value.code(), err.value.details())
            assert "not received whole within 1.5 s" in err.value.details() and time.monotonic() - started < 5
        # A connection that never sends its preface, and one whose header block never ends.
        assert _goaway(_raw_grpc(router, b"")) == ENHANCE_YOUR_CALM
        got = _raw_grpc(router, PREFACE + settings_frame({}) + frame(HEADERS, 0, 1, b"\x82"))
        assert _goaway(got) == ENHANCE_YOUR_CALM and b"no whole request head within 1 s" in got
        # Five calls open at once on one connection: the fifth is refused.
        got = _raw_grpc(router, PREFACE + settings_frame({}) + b"".join(_call(s) for s in (1, 3, 5, 7, 9)), wait=0.8)
        assert frame(RST_STREAM, 0, 9, REFUSED_STREAM.to_bytes(4, "big")) in got
        # Calls opened and reset at once, 25 in a second: a rapid-reset flood.
        got = _raw_grpc(router, PREFACE + settings_frame({}) + b"".join(
            _call(2 * i + 1) + frame(RST_STREAM, 0, 2 * i + 1, bytes(4)) for i in range(25)))
        assert _goaway(got) == ENHANCE_YOUR_CALM and b"more than 20 RST_STREAM frames a second" in got
        counted.expect({("body_timeout_s", "grpc"): 1, ("head_timeout_s", "grpc"): 2,
                        ("streams_per_connection", "grpc"): 1, ("resets_per_second", "grpc"): 1})
    healthy(router, server.keys.inference)
