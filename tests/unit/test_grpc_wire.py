"""The gRPC router's own HTTP/2 and HPACK, between real grpcio peers on loopback: a grpcio
client calls the router, which forwards to a grpcio server standing in for TorchServe
(TorchServe itself is in tests/integration/test_router_grpc.py)."""
from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator, Awaitable, Callable

import grpc
import hpack
import pytest
from google.protobuf import empty_pb2

from tsfleet.router.fronts.grpc_front import GrpcRouter, start_grpc_router, stop_grpc_router
from tsfleet.router.wire.grpc_wire import GrpcServerConnection
from tsfleet.router.wire.hpack_codec import Decoder, HpackError, encode
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc
from tsfleet.router.policy.routing import Route, RoutingTable

BIG = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20),
       ("grpc.max_metadata_size", 1 << 20), ("grpc.absolute_max_metadata_size", 1 << 20)]
KEY = (("authorization", "Bearer k"),)


class Upstream(pb_grpc.InferenceAPIsServiceServicer):
    """Echoes what reached it: model, version, key, input size; fails on request."""

    def __init__(self) -> None:
        self.started, self.cancelled = asyncio.Event(), asyncio.Event()
        self.streamed = 0
        self.lose_next = False  # never answer the next call, as TorchServe with a job its dead worker held

    async def Ping(self, request, context):  # noqa: N802 (gRPC's method names)
        return pb.TorchServeHealthResponse(health="Healthy")

    async def Predictions(self, request, context):  # noqa: N802
        if request.model_name == "missing":
            await context.abort(grpc.StatusCode.NOT_FOUND, "Model not found: missing, 100% sure ✓")
        if self.lose_next:
            self.lose_next = False
            context.add_done_callback(lambda _: self.cancelled.set())
            await asyncio.Event().wait()
        if request.model_name == "slow":
            context.add_done_callback(lambda _: self.cancelled.set())
            self.started.set()
            await asyncio.sleep(30)
        if request.model_name == "unhurried":  # answers a while after the router is told to stop
            self.started.set()
            await asyncio.sleep(0.5)
        key = dict(context.invocation_metadata()).get("authorization")
        if request.model_name == "echo-metadata":
            note = dict(context.invocation_metadata())["x-note"]
            await context.send_initial_metadata((("x-note-back", note[::-1]),))
            return pb.PredictionResponse(prediction=note.encode())
        reply = f"{request.model_name}|{request.model_version}|{key}|{len(request.input['data'])}"
        return pb.PredictionResponse(prediction=reply.encode() + bytes(len(request.input["data"])))

    async def StreamPredictions(self, request, context):  # noqa: N802
        if request.model_name == "firehose":  # far more than a client that does not read takes
            context.add_done_callback(lambda _: self.cancelled.set())
            for _ in range(1000):
                yield pb.PredictionResponse(prediction=b"w" * (1 << 20))
                self.streamed += 1
        for i in range(3):
            yield pb.PredictionResponse(prediction=f"{request.model_version}:{i}".encode())

    async def StreamPredictions2(self, request_iterator, context):  # noqa: N802
        if context.invocation_metadata() and dict(context.invocation_metadata()).get("x-stall"):
            await asyncio.Event().wait()  # never reads: its window closes
        async for req in request_iterator:
            yield pb.PredictionResponse(prediction=f"{req.model_version}:{req.input['data'].decode()}".encode())


@pytest.fixture
def channel_box() -> list:
    """Hands a test the client channel, the router's port and the router that ``run`` makes."""
    return []


def run(test: Callable[[pb_grpc.InferenceAPIsServiceStub, Upstream, RoutingTable], Awaitable[None]],
        compression: grpc.Compression | None = None, channel_box: list | None = None) -> None:
    async def main() -> None:
        upstream = Upstream()
        server = grpc.aio.server(options=BIG)
        pb_grpc.add_InferenceAPIsServiceServicer_to_server(upstream, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        table = RoutingTable({"m": Route("m", "1.0", {"1.0": 100.0}, streaming=True)})
        router, router_port = await start_grpc_router(table, f"127.0.0.1:{port}", min_attempt_s=0.2)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{router_port}", options=BIG, compression=compression)
        if channel_box is not None:
            channel_box.extend([channel, router_port, router])
        try:
            await asyncio.wait_for(test(pb_grpc.InferenceAPIsServiceStub(channel), upstream, table), 20)
        finally:
            await channel.close()
            await stop_grpc_router(router, grace=0.5)
            await server.stop(0)

    asyncio.run(main())


def req(model: str = "m", data: bytes = b"hi", version: str = "") -> pb.PredictionsRequest:
    return pb.PredictionsRequest(model_name=model, model_version=version, input={"data": data})


def test_a_call_is_routed_with_its_metadata_and_names_the_version() -> None:
    async def test(stub, upstream, table) -> None:
        call = stub.Predictions(req(), metadata=KEY)
        assert (await call).prediction.startswith(b"m|1.0|Bearer k|2")
        assert dict(await call.initial_metadata())["x-model-version"] == "1.0"
        assert (await stub.Ping(empty_pb2.Empty())).health == "Healthy"
        assert table.stats[("m", "1.0")].requests == 1

    run(test)


def test_messages_larger_than_every_window_cross_both_ways() -> None:
    """8 MiB each way: more than HTTP/2's 64 KiB default windows and 16 KiB frames."""
    async def test(stub, upstream, table) -> None:
        replies = await asyncio.gather(*[stub.Predictions(req(data=bytes([i]) * (8 << 20))) for i in range(3)])
        for reply in replies:
            assert reply.prediction.startswith(b"m|1.0|None|8388608") and len(reply.prediction) > 8 << 20

    run(test)


def test_many_calls_at_once_on_one_connection_all_get_their_own_answer() -> None:
    async def test(stub, upstream, table) -> None:
        replies = await asyncio.gather(*[stub.Predictions(req(data=b"x" * i)) for i in range(300)])
        assert [int(r.prediction.split(b"|")[3][:3].rstrip(b"\0")) for r in replies] == list(range(300))

    run(test)


def test_header_blocks_larger_than_a_frame_are_split_and_joined() -> None:
    """40 KB of metadata each way: HEADERS + CONTINUATION frames (a grpcio server takes 16 KB frames)."""
    async def test(stub, upstream, table) -> None:
        note = "".join(chr(0x61 + i % 26) for i in range(40_000))
        call = stub.Predictions(req(model="echo-metadata"), metadata=(("x-note", note),))
        assert (await call).prediction == note.encode()
        assert dict(await call.initial_metadata())["x-note-back"] == note[::-1]

    run(test)


def test_an_upstream_error_reaches_the_client_unchanged() -> None:
    async def test(stub, upstream, table) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predictions(req(model="missing"))
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.NOT_FOUND, "Model not found: missing, 100% sure ✓")

    run(test)


def test_streams_both_ways_carry_the_chosen_version() -> None:
    async def test(stub, upstream, table) -> None:
        table.set_weights("m", {"1.0": 0, "2.0": 100})
        got = [r.prediction async for r in stub.StreamPredictions(req())]
        assert got == [b"2.0:0", b"2.0:1", b"2.0:2"]

        async def sequence() -> AsyncIterator[pb.PredictionsRequest]:
            for word in ("a", "b", "c"):
                yield req(data=word.encode())
        assert [r.prediction async for r in stub.StreamPredictions2(sequence())] == [b"2.0:a", b"2.0:b", b"2.0:c"]

    run(test)


def test_a_compressed_request_is_still_routed() -> None:
    async def test(stub, upstream, table) -> None:
        table.set_weights("m", {"1.0": 0, "2.0": 100})
        assert (await stub.Predictions(req(data=b"z" * 5000))).prediction.startswith(b"m|2.0|None|5000")

    run(test, compression=grpc.Compression.Gzip)


def test_a_client_that_gives_up_cancels_the_upstream_call() -> None:
    async def test(stub, upstream, table) -> None:
        call = stub.Predictions(req(model="slow"))  # no deadline: only the router can stop it
        await asyncio.wait_for(upstream.started.wait(), 5)
        call.cancel()
        await asyncio.wait_for(upstream.cancelled.wait(), 5)
        assert (await stub.Predictions(req())).prediction.startswith(b"m|1.0")  # the connection still serves

    run(test)


def test_a_call_never_answered_is_given_up_and_retried() -> None:
    async def test(stub, upstream, table) -> None:
        # Enough answers for the arm's p99, which the first attempt's deadline is made from.
        deadline = time.monotonic() + 10
        while table.attempt_timeout("m", "1.0", 130, 0.2) == 130 and time.monotonic() < deadline:
            await stub.Predictions(req())
        st = table.stats[("m", "1.0")]
        before = st.requests
        upstream.lose_next = True
        assert (await stub.Predictions(req(), timeout=10)).prediction.startswith(b"m|1.0")
        await asyncio.wait_for(upstream.cancelled.wait(), 5)  # the lost attempt was reset
        assert (st.requests - before, st.errors, st.retries) == (2, 1, 1)

    run(test)


def test_an_unknown_method_is_answered_by_the_upstream(channel_box: list) -> None:
    async def test(stub, upstream, table) -> None:
        nope = channel_box[0].unary_unary("/org.pytorch.serve.grpc.inference.InferenceAPIsService/Nope",
                                          request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await nope(b"")
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    run(test, channel_box=channel_box)


def test_upstream_down_is_unavailable_and_recovers_when_it_returns() -> None:
    async def main() -> None:
        upstream_server = grpc.aio.server(options=BIG)
        pb_grpc.add_InferenceAPIsServiceServicer_to_server(Upstream(), upstream_server)
        port = upstream_server.add_insecure_port("127.0.0.1:0")
        await upstream_server.start()
        table = RoutingTable({})
        router, router_port = await start_grpc_router(table, f"127.0.0.1:{port}")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{router_port}")
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        try:
            assert (await stub.Predictions(req())).prediction.startswith(b"m|")
            await upstream_server.stop(0)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Predictions(req())
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"TorchServe is not reachable at 127.0.0.1:{port}" in err.value.details()
            upstream_server = grpc.aio.server(options=BIG)
            pb_grpc.add_InferenceAPIsServiceServicer_to_server(Upstream(), upstream_server)
            assert upstream_server.add_insecure_port(f"127.0.0.1:{port}") == port
            await upstream_server.start()
            assert (await stub.Predictions(req())).prediction.startswith(b"m|")
        finally:
            await channel.close()
            await stop_grpc_router(router, grace=0.5)
            await upstream_server.stop(0)

    asyncio.run(asyncio.wait_for(main(), 20))


def test_hpack_decoder_follows_the_peers_table_and_huffman_strings() -> None:
    encoder, decoder = hpack.Encoder(), Decoder()
    blocks = [[(":path", "/a"), ("x-user-id", "alice"), ("authorization", "Bearer " + "k" * 40)],
              [(":path", "/a"), ("x-user-id", "bob"), ("authorization", "Bearer " + "k" * 40)]]
    for headers in blocks * 3:
        assert decoder.decode(encoder.encode(headers)) == [(k.encode(), v.encode()) for k, v in headers]
    encoder.header_table_size = 64  # a size update, then evictions
    for headers in blocks:
        assert decoder.decode(encoder.encode(headers)) == [(k.encode(), v.encode()) for k, v in headers]
    ours = [(b":status", b"200"), (b"x-model-version", b"1.0"), (b"grpc-message", b"x" * 300)]
    assert hpack.Decoder().decode(encode(ours), raw=True) == ours
    with pytest.raises(HpackError):
        Decoder().decode(b"\xff\x80")  # index past every table
    with pytest.raises(HpackError):
        Decoder().decode(b"\x00\x81\xff\x01a")  # a Huffman name that is all padding


def test_a_remembered_header_block_is_decoded_again_once_the_table_changes() -> None:
    decoder, first_dynamic = Decoder(), b"\xbe"  # index 62: the newest entry of the dynamic table
    assert decoder.decode(b"\x40\x03x-a\x011") == [(b"x-a", b"1")]  # a literal added to the table
    for _ in range(3):  # the same bytes again: from memory while the table stands still
        assert decoder.decode(first_dynamic) == [(b"x-a", b"1")]
    assert decoder.decode(b"\x40\x03x-b\x012") == [(b"x-b", b"2")]  # a new entry moves the old one to 63
    assert decoder.decode(first_dynamic) == [(b"x-b", b"2")]
    assert decoder.decode(b"\xbf") == [(b"x-a", b"1")]
    assert decoder.decode(b"\x3f\x00") == []  # a table size update to 31 bytes: both entries evicted
    with pytest.raises(HpackError):
        decoder.decode(first_dynamic)


def test_a_connection_that_does_not_speak_http2_is_closed_and_others_are_served() -> None:
    async def test(stub, upstream, table) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", channel_box[1])
        writer.write(b"GET /predictions/m HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await reader.read()  # until the router closes the connection
        assert b"not an HTTP/2 connection preface" in answer  # in its GOAWAY
        writer.close()
        assert (await stub.Predictions(req())).prediction.startswith(b"m|1.0")

    channel_box: list = []
    run(test, channel_box=channel_box)


@pytest.mark.parametrize("method", ["choose", "record"])  # while routing the call, while answering it
def test_a_fault_in_the_router_fails_that_call_at_once_and_no_other(method: str) -> None:
    async def test(stub, upstream, table) -> None:
        real = getattr(table, method)

        def broken(model: str, *args: object, **kwargs: object):
            if model == "boom":
                raise RuntimeError("a bug")
            return real(model, *args, **kwargs)

        setattr(table, method, broken)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predictions(req(model="boom"), timeout=10)
        assert err.value.code() == grpc.StatusCode.INTERNAL  # not the client's deadline
        # Both connections, the client's and TorchServe's, serve on.
        assert (await stub.Predictions(req())).prediction.startswith(b"m|1.0")

    run(test)


def test_a_prediction_in_flight_is_answered_when_the_router_stops(channel_box: list) -> None:
    async def test(stub, upstream, table) -> None:
        call = asyncio.ensure_future(stub.Predictions(req(model="unhurried"), timeout=10))
        await asyncio.wait_for(upstream.started.wait(), 5)
        await stop_grpc_router(channel_box[2], grace=5)
        assert (await call).prediction.startswith(b"unhurried|")
        with pytest.raises(grpc.aio.AioRpcError) as err:  # and a new call finds no router
            await stub.Predictions(req(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE

    run(test, channel_box=channel_box)


def test_a_request_stream_the_upstream_does_not_read_is_not_buffered_without_end(monkeypatch) -> None:
    async def test(stub, upstream, table) -> None:
        call = stub.StreamPredictions2(metadata=(("x-stall", "1"),), timeout=15)
        for _ in range(200):  # 200 MiB, far more than any window on the way holds
            try:
                await call.write(req(data=b"f" * (1 << 20)))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                break  # the call is over
        # The router ends the call (RESOURCE_EXHAUSTED; grpcio may report its own failed
        # write as INTERNAL instead) long before the deadline, and lets go of what it held.
        assert await call.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL)
        router = box[2]
        assert router.pool.conn is not None and not router.pool.conn.blocked
        assert router.counters.held_bytes == 1

    box: list = []
    monkeypatch.setattr(GrpcRouter, "max_held", 8 << 20)
    run(test, channel_box=box)


def test_an_answer_stream_the_client_does_not_read_is_dropped_not_held(monkeypatch) -> None:
    async def test(stub, upstream, table) -> None:
        call = stub.StreamPredictions(req(model="firehose"), timeout=15)
        # Nothing read: the router's share fills up, it gives the stream up and cancels upstream.
        await asyncio.wait_for(upstream.cancelled.wait(), 10)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in call:
                pass
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert upstream.streamed < 100  # cancelled, not run to its end
        assert not box[2].connections or all(not c.blocked for c in box[2].connections)
        assert box[2].counters.held_bytes == 1

    box: list = []
    monkeypatch.setattr(GrpcServerConnection, "max_held", 8 << 20)  # what a Relay lets wait for its client
    run(test, channel_box=box)


def test_a_request_over_the_size_limit_is_refused_and_the_connection_serves_on(monkeypatch) -> None:
    async def test(stub, upstream, table) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predictions(req(data=b"x" * (3 << 20)), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than the router's 2 MiB" in err.value.details()
        assert (await stub.Predictions(req(data=b"x" * (1 << 20)))).prediction.startswith(b"m|1.0")

    monkeypatch.setattr(GrpcServerConnection, "max_request", 2 << 20)
    run(test)


async def _raw_h2(port: int, frames: bytes, wait: float = 2.0) -> bytes:
    """What the router writes back on a raw connection that sends ``frames`` after the
    preface and SETTINGS, until it closes or ``wait`` seconds pass."""
    from tsfleet.router.wire.h2frames import PREFACE, settings_frame

    return await raw(port, PREFACE + settings_frame({}) + frames, wait)


async def raw(port: int, data: bytes, wait: float = 1.0) -> bytes:
    """What the router writes back to ``data`` on a raw connection, until it closes or ``wait`` s pass."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = b""
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), wait):
            got += chunk
    except asyncio.TimeoutError:
        pass
    writer.close()
    return got


def _call_headers(stream: int) -> bytes:
    from tsfleet.router.wire.h2frames import END_HEADERS, HEADERS, frame

    block = encode([(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/org.pytorch.serve.grpc.inference"
                    b".InferenceAPIsService/Predictions"), (b":authority", b"x"), (b"content-type", b"application/grpc"),
                    (b"te", b"trailers")])
    return frame(HEADERS, END_HEADERS, stream, block)


def test_streams_past_max_concurrent_streams_are_refused_and_others_served(monkeypatch) -> None:
    from tsfleet.router.wire.h2frames import REFUSED_STREAM, RST_STREAM, frame

    async def test(stub, upstream, table) -> None:
        # Three calls opened and left waiting for their message: the third is one too many.
        got = await _raw_h2(channel_box[1], b"".join(_call_headers(s) for s in (1, 3, 5)), wait=1.0)
        assert frame(RST_STREAM, 0, 5, REFUSED_STREAM.to_bytes(4, "big")) in got
        assert frame(RST_STREAM, 0, 3, REFUSED_STREAM.to_bytes(4, "big")) not in got
        assert (await stub.Predictions(req())).prediction.startswith(b"m|1.0")

    monkeypatch.setattr(GrpcServerConnection, "streams_in", 2)
    channel_box: list = []
    run(test, channel_box=channel_box)


@pytest.mark.parametrize("flood", ["continuation", "indexed"])
def test_a_header_list_past_its_limit_is_refused_before_it_is_all_held(flood: str) -> None:
    """A block too large to hold (as sent) is a GOAWAY; a list too large decoded (HPACK's
    amplification) is decoded to its end, refuses its own stream with RESOURCE_EXHAUSTED
    and the connection goes on, its table still the client's."""
    from tsfleet.router.wire.h2frames import (CONTINUATION, END_HEADERS, END_STREAM, ENHANCE_YOUR_CALM, GOAWAY,
                                              HEADERS, RST_STREAM, frame)

    async def test(stub, upstream, table) -> None:
        if flood == "continuation":  # header block fragments that never end: once 200 MiB held
            frames = frame(HEADERS, 0, 1, b"\x00" * 16_000) + frame(CONTINUATION, 0, 1, b"\x00" * 16_000) * 20
        else:  # a 4,000-byte field put in the table, then named 40 times in 40 bytes: HPACK's amplification
            field = b"\x40" + bytes([0x01]) + b"x" + bytes([0x7F, 0xA1, 0x1E]) + b"v" * 4000  # literal, indexed
            frames = frame(HEADERS, END_HEADERS, 1, field + bytes([0xBE]) * 40)  # index 62: that field
            # Then a call on the same connection naming that field once: read only if the table kept it.
            call = _call_headers(3)
            frames += frame(HEADERS, END_HEADERS | END_STREAM, 3, call[9:] + bytes([0xBE]))
        got = await _raw_h2(channel_box[1], frames)
        at = got.find(bytes([GOAWAY, 0]) + bytes(4))
        if flood == "continuation":
            assert at >= 0 and int.from_bytes(got[at + 10:at + 14], "big") == ENHANCE_YOUR_CALM, got[:100]
        else:
            assert at < 0, got[at:at + 60]
            assert b"grpc-status\x018" in got and b"header list limit" in got  # RESOURCE_EXHAUSTED, stream 1
            assert frame(RST_STREAM, 0, 1, bytes(4)) in got  # and read no more of it
            assert b"grpc-status\x013" in got and b"carries 0 bytes" in got  # stream 3: read, and answered
        assert channel_box[2].counters.header_list_bytes == 1
        assert (await stub.Predictions(req())).prediction.startswith(b"m|1.0")

    channel_box: list = []
    run(test, channel_box=channel_box)


def test_credentials_are_re_encoded_never_indexed_and_no_value_of_theirs_is_kept() -> None:
    from tsfleet.router.wire import hpack_codec

    hpack_codec._cache.clear()
    block = encode([(b"authorization", b"Bearer secret-key"), (b"x-note", b"n" * 40), (b"content-type", b"application/grpc")])
    decoded = hpack.Decoder().decode(block, raw=True)
    assert decoded == [(b"authorization", b"Bearer secret-key"), (b"x-note", b"n" * 40),
                       (b"content-type", b"application/grpc")]
    assert isinstance(decoded[0], hpack.NeverIndexedHeaderTuple)  # RFC 7541 6.2.3, as a peer reads it
    assert not isinstance(decoded[1], hpack.NeverIndexedHeaderTuple)
    assert list(hpack_codec._cache) == [(b"content-type", b"application/grpc")]
    encode([(b"x-" + b"n" * 100_000, b"v")] * 3)  # a huge name is not kept either
    assert len(hpack_codec._cache) == 1


def test_requests_a_connection_holds_past_its_cap_are_refused_and_its_other_calls_go_on(monkeypatch) -> None:
    from tsfleet.router.wire.h2frames import DATA, RST_STREAM, frame

    async def test(stub, upstream, table) -> None:
        # Three calls each sending 1 MB of a message they never end: the third passes 2 MiB.
        frames = b"".join(_call_headers(s) + frame(DATA, 0, s, b"\x00" + (10_000_000).to_bytes(4, "big")
                                                   + bytes(999_995)) for s in (1, 3, 5))
        got = await _raw_h2(channel_box[1], frames, wait=1.0)
        assert b"grpc-status\x018" in got and b"hold over 2 MiB" in got  # RESOURCE_EXHAUSTED, for stream 5
        assert frame(RST_STREAM, 0, 5, bytes(4)) in got and frame(RST_STREAM, 0, 3, bytes(4)) not in got
        assert (await stub.Predictions(req())).prediction.startswith(b"m|1.0")

    monkeypatch.setattr(GrpcServerConnection, "max_buffered", 2 << 20)
    channel_box: list = []
    run(test, channel_box=channel_box)


@pytest.mark.parametrize("body,words", [
    (b"\x00\x00\x00\x00\x64abc", b"the call carries 3 bytes after its prefix, which declares 100"),
    (b"\x00\x00\x00\x00\x02abc", b"the call carries 3 bytes after its prefix, which declares 2"),
    (b"\x00\x00", b"the call carries 2 bytes, not a length-prefixed message"),
    (b"", b"the call carries 0 bytes, not a length-prefixed message"),
])
def test_a_predictions_body_that_is_not_one_message_is_invalid_argument(body: bytes, words: bytes) -> None:
    from tsfleet.router.wire.h2frames import DATA, END_STREAM, frame

    async def test(stub, upstream, table) -> None:
        got = await _raw_h2(channel_box[1], _call_headers(1) + frame(DATA, END_STREAM, 1, body), wait=1.0)
        assert b"grpc-status\x013" in got and words in got, got[-300:]  # the router's own INVALID_ARGUMENT
        assert (await stub.Predictions(req())).prediction.startswith(b"m|1.0")

    channel_box: list = []
    run(test, channel_box=channel_box)


def test_a_field_sent_never_indexed_is_passed_on_never_indexed_whatever_its_name() -> None:
    from tsfleet.router.wire import hpack_codec

    hpack_codec._cache.clear()
    sent = hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(b"x-session", b"s3cret"),
                                   hpack.NeverIndexedHeaderTuple(b"content-type", b"application/grpc"),
                                   (b"x-plain", b"p")], huffman=False)
    got = hpack_codec.Decoder().decode(sent)
    assert got == [(b"x-session", b"s3cret"), (b"content-type", b"application/grpc"), (b"x-plain", b"p")]
    again = hpack.Decoder().decode(encode(got), raw=True)  # RFC 7541 6.2.3: as the next hop reads it
    assert [isinstance(h, hpack.NeverIndexedHeaderTuple) for h in again] == [True, True, False]
    assert hpack_codec._cache == {}  # nothing sent never indexed is kept, even under a cached name


def test_the_decoder_remembers_only_short_blocks() -> None:
    decoder = Decoder()
    short = encode([(b":path", b"/p"), (b"x-a", b"b")])
    large = encode([(b"x-big", b"v" * 4000)])
    assert decoder.decode(short) == decoder.decode(short) == [(b":path", b"/p"), (b"x-a", b"b")]
    assert decoder.decode(large) == [(b"x-big", b"v" * 4000)]
    assert list(decoder._seen) == [short]  # a client's large blocks are not kept past their call
