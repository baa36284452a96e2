"""fleet.yaml's router.limits: read and checked, documented where they cannot drift, enforced
by both fronts with each one's answer, and counted exactly once each time one fires
(tests/integration/test_router_limits.py: the same through a router process before TorchServe)."""
from __future__ import annotations

import asyncio
import copy
import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Awaitable, Callable

import grpc
import pytest
import yaml

from tests.prometheus_text import samples, types
from tests.unit.test_grpc_wire import BIG, Upstream, _call_headers, raw, req
from tsfleet.errors import ManifestError
from tsfleet.manifest import parse_fleet
from tsfleet.router.fronts.grpc_front import GrpcRouter, start_grpc_router, stop_grpc_router
from tsfleet.router.policy.routing import Route, RoutingTable
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc
from tsfleet.router.wire import h2frames, http1_messages
from tsfleet.router.wire.h2frames import (DATA, ENHANCE_YOUR_CALM, GOAWAY, HEADERS, PREFACE, RST_STREAM, frame,
                                          settings_frame)
from tsfleet.router.wire.http1 import Listener, Request, Response
from tsfleet.router.wire.limits import (DEFAULT_LIMITS, NAMES, OF_FRONT, LimitCounters, RouterLimits, prometheus,
                                        table, with_values)

ROOT = Path(__file__).resolve().parents[2]
DOC = yaml.safe_load((ROOT / "fleet.yaml").read_text())
PREDICT = "/org.pytorch.serve.grpc.inference.InferenceAPIsService/Predictions"
LOCAL = [("grpc.use_local_subchannel_pool", 1)]  # a channel of its own connection, not one shared in-process


# ------------------------------------------------------------------ the one place, and its docs
def test_the_defaults_are_the_limits_the_router_had() -> None:
    assert asdict(DEFAULT_LIMITS) == {
        "connections": 4096, "streams_per_connection": 1000, "head_bytes": 64 << 10, "header_lines": 100,
        "trailer_bytes": 8 << 10, "header_list_bytes": 64 << 10, "body_bytes": 16 << 20, "message_bytes": 64 << 20,
        "buffered_bytes": 128 << 20, "held_bytes": 64 << 20, "head_timeout_s": 60.0, "body_timeout_s": 60.0,
        "idle_timeout_s": 75.0, "resets_per_second": 500, "pings_per_second": 1000, "settings_per_second": 100}
    # What the wire classes fall back to without limits (tests, the upstream side) is the same.
    assert (http1_messages.MAX_HEAD, http1_messages.MAX_HEADERS, http1_messages.MAX_TRAILERS) == (
        DEFAULT_LIMITS.head_bytes, DEFAULT_LIMITS.header_lines, DEFAULT_LIMITS.trailer_bytes)
    assert (h2frames.RECV_HEADER_LIST, h2frames.RECV_CONCURRENT_STREAMS) == (
        DEFAULT_LIMITS.header_list_bytes, DEFAULT_LIMITS.streams_per_connection)
    assert h2frames.FLOOD_BUDGET == {h2frames.RST_STREAM: DEFAULT_LIMITS.resets_per_second,
                                     h2frames.PING: DEFAULT_LIMITS.pings_per_second,
                                     h2frames.SETTINGS: DEFAULT_LIMITS.settings_per_second}
    assert GrpcRouter.max_held == DEFAULT_LIMITS.held_bytes


def test_the_docs_table_is_the_one_the_limits_state() -> None:
    assert table() in (ROOT / "docs" / "router.md").read_text(), "paste `python -m tsfleet.router.wire.limits` into docs/router.md"


def test_fleet_yaml_lists_every_limit_with_its_default() -> None:
    text = (ROOT / "fleet.yaml").read_text()
    listed = {m[1]: yaml.safe_load(m[2]) for m in re.finditer(r"^ {4}# ([a-z_]+): (\S+)", text, re.M)}
    assert listed == asdict(DEFAULT_LIMITS)
    assert DOC["router"] == {"limits": None}  # all commented out: the defaults


# ------------------------------------------------------------------ fleet.yaml
def _with_router(router: object) -> dict:
    doc = copy.deepcopy(DOC)
    doc["router"] = router
    return doc


def test_router_limits_are_read_from_the_manifest_over_the_defaults() -> None:
    fleet = parse_fleet(_with_router({"limits": {"connections": 10, "body_timeout_s": 2.5, "head_timeout_s": 1}}), ROOT)
    assert fleet.router_limits == RouterLimits(connections=10, body_timeout_s=2.5, head_timeout_s=1)
    assert parse_fleet(_with_router(None), ROOT).router_limits == DEFAULT_LIMITS
    assert parse_fleet({k: v for k, v in DOC.items() if k != "router"}, ROOT).router_limits == DEFAULT_LIMITS


@pytest.mark.parametrize("router,message", [
    ({"limits": {"conections": 10}}, "router.limits: unknown key(s) conections (allowed: connections, "),
    ({"limits": {"connections": 0}}, "router.limits.connections: expected a positive integer, got 0"),
    ({"limits": {"body_bytes": -1}}, "router.limits.body_bytes: expected a positive integer, got -1"),
    ({"limits": {"header_lines": 1.5}}, "router.limits.header_lines: expected a positive integer, got 1.5"),
    ({"limits": {"header_lines": "100"}}, "router.limits.header_lines: expected a positive integer, got '100'"),
    ({"limits": {"head_timeout_s": True}}, "router.limits.head_timeout_s: expected a positive number, got True"),
    ({"limits": {"idle_timeout_s": 0.0}}, "router.limits.idle_timeout_s: expected a positive number, got 0.0"),
    ({"limits": [1]}, "router.limits: expected a mapping, got list"),
    ({"limit": {}}, "router: unknown key(s) limit (allowed: limits)"),
    ("big", "router: expected a mapping, got str"),
])
def test_a_bad_router_limit_names_its_key(router: object, message: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_fleet(_with_router(router), ROOT)
    assert message in str(err.value)


def test_limits_travel_to_a_front_process_and_back_unchanged() -> None:
    limits = RouterLimits(connections=7, head_timeout_s=0.5)
    assert with_values(json.loads(json.dumps(asdict(limits)))) == limits


def test_the_grpc_message_limit_is_never_more_than_torchserve_takes() -> None:
    """TorchServe's grpc-java resets a message over its max_request_size without a status."""
    from tsfleet.build.properties import read_properties
    from tsfleet.router.wire.limits import VERSION_ROOM, under_torchserve

    ts_max = int(read_properties(ROOT / "config.properties")["max_request_size"])  # 10 MiB, as rendered
    assert under_torchserve(DEFAULT_LIMITS, ts_max).message_bytes == ts_max - VERSION_ROOM
    assert under_torchserve(DEFAULT_LIMITS, ts_max).body_bytes == DEFAULT_LIMITS.body_bytes  # REST: TorchServe's 413
    assert under_torchserve(DEFAULT_LIMITS, None) == DEFAULT_LIMITS
    small = RouterLimits(message_bytes=1 << 20)
    assert under_torchserve(small, ts_max) == small  # a limit below TorchServe's stays


# ------------------------------------------------------------------ counters
def test_counters_add_up_per_front_in_prometheus_form() -> None:
    here = {"rest": LimitCounters(), "grpc": LimitCounters()}
    fronts = {"rest": LimitCounters(), "grpc": LimitCounters()}
    here["rest"].body_bytes += 1
    fronts["rest"].add({"body_bytes": 2, "head_bytes": 1})
    fronts["grpc"].hit("header_list_bytes")
    text = prometheus(here, fronts)
    assert types(text)["tsfleet_router_limit_hits_total"] == "counter"
    hits = {(dict(labels)["limit"], dict(labels)["front"]): n
            for labels, n in samples(text, "tsfleet_router_limit_hits_total").items()}
    assert hits[("body_bytes", "rest")] == 3 and hits[("head_bytes", "rest")] == 1
    assert hits[("header_list_bytes", "grpc")] == 1
    # Every limit a front has is there from the start (at 0), and only those.
    assert set(hits) == {(name, front) for front in OF_FRONT for name in OF_FRONT[front]}
    assert sum(hits.values()) == 5
    assert set(OF_FRONT["rest"]) | set(OF_FRONT["grpc"]) == set(NAMES)


def test_a_front_process_tells_the_leader_what_it_counted_once() -> None:
    from tsfleet.router.processes import Fronts, _Front, _Leader

    class Lines:
        def __init__(self) -> None:
            self.lines: list[bytes] = []

        def write(self, data: bytes) -> None:
            self.lines.append(data)

    async def main() -> dict[str, int]:
        hits = {"rest": LimitCounters(), "grpc": LimitCounters()}
        sent = Lines()
        leader = _Leader(None, sent, RoutingTable({}), hits=hits)  # type: ignore[arg-type]
        hits["rest"].body_bytes += 2
        leader.tell_hits()
        leader.tell_hits()  # nothing new: nothing sent
        hits["rest"].body_bytes += 1
        hits["grpc"].connections += 1
        leader.tell_hits()
        assert len(sent.lines) == 2
        fronts = Fronts(RoutingTable({}), 0, {})
        reader = asyncio.StreamReader()
        for line in sent.lines:
            reader.feed_data(line)
        reader.feed_eof()
        await fronts._hear(_Front(None, Lines(), reader))  # type: ignore[arg-type]
        return {**{f"rest.{k}": v for k, v in fronts.hits["rest"].counts().items() if v},
                **{f"grpc.{k}": v for k, v in fronts.hits["grpc"].counts().items() if v}}

    assert asyncio.run(main()) == {"rest.body_bytes": 3, "grpc.connections": 1}


# ------------------------------------------------------------------ REST
REST_LIMITS = RouterLimits(connections=3, head_bytes=1024, header_lines=10, trailer_bytes=64, body_bytes=1000,
                           head_timeout_s=0.4, body_timeout_s=0.8, idle_timeout_s=1.0)


async def ok(request: Request) -> Response:
    return Response(200, b"ok", [])


async def exchange(port: int, data: bytes) -> tuple[int, bytes]:
    """Status and body of the answer to ``data`` on a fresh connection, read until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    got = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = got.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_each_rest_limit_is_answered_and_counted_once() -> None:
    counters = LimitCounters()

    async def main() -> None:
        listener = Listener(ok, limits=REST_LIMITS, counters=counters)
        port = await listener.start("127.0.0.1", 0)
        try:
            assert (await exchange(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 2000))[0] == 431  # never ends
            assert (await exchange(port, b"GET / HTTP/1.1\r\nX: " + b"a" * 1500 + b"\r\n\r\n"))[0] == 431
            assert (await exchange(port, b"GET / HTTP/1.1\r\n" + b"X: a\r\n" * 12 + b"\r\n"))[0] == 431
            assert (await exchange(port, b"POST / HTTP/1.1\r\nContent-Length: 1001\r\n\r\n"))[0] == 413
            chunked = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            status, body = await exchange(port, chunked + (b"258\r\n" + b"a" * 600 + b"\r\n") * 2)
            assert status == 413 and b"1000-byte limit" in body
            status, body = await exchange(port, chunked + b"0\r\nX-T: " + b"t" * 100 + b"\r\n\r\n")
            assert status == 431 and b"trailers over 64 bytes" in body
            # Deadlines: a head never whole, a body never whole (each sends nothing more).
            head, whole = await asyncio.gather(
                exchange(port, b"GET / HTTP/1.1\r\n"),
                exchange(port, b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n12345"))
            assert head[0] == 408 and b"head not received whole within 0.4 s" in head[1]
            assert whole[0] == 408 and b"not received whole within 0.8 s" in whole[1]
            # Three connections held: a fourth is 503, and the others are served.
            held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
            while len(listener.connections) < 3:
                await asyncio.sleep(0.01)
            status, body = await exchange(port, b"GET / HTTP/1.1\r\n\r\n")
            assert status == 503 and b"too many connections" in body
            for _, writer in held:
                writer.close()
            while listener.connections:
                await asyncio.sleep(0.01)
            # One left idle is closed (a request answered first: keep-alive, then nothing).
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            got = await asyncio.wait_for(reader.read(), 5)  # until the idle timer closes it
            assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok")
            writer.close()
        finally:
            listener.close()

    asyncio.run(main())
    assert {k: v for k, v in counters.counts().items() if v} == {
        "head_bytes": 2, "header_lines": 1, "body_bytes": 2, "trailer_bytes": 1, "head_timeout_s": 1,
        "body_timeout_s": 1, "connections": 1, "idle_timeout_s": 1}


# ------------------------------------------------------------------ gRPC
def grpc_run(limits: RouterLimits, test: Callable[[GrpcRouter, int, pb_grpc.InferenceAPIsServiceStub], Awaitable[None]]) -> None:
    async def main() -> None:
        server = grpc.aio.server(options=BIG)
        pb_grpc.add_InferenceAPIsServiceServicer_to_server(Upstream(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        table = RoutingTable({"m": Route("m", "1.0", {"1.0": 100.0}, streaming=True)})
        router, router_port = await start_grpc_router(table, f"127.0.0.1:{port}", limits=limits)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{router_port}", options=BIG + LOCAL)
        try:
            await asyncio.wait_for(test(router, router_port, pb_grpc.InferenceAPIsServiceStub(channel)), 20)
        finally:
            await channel.close()
            await stop_grpc_router(router, grace=0.5)
            await server.stop(0)

    asyncio.run(main())


def goaway_code(got: bytes) -> int | None:
    at = got.find(bytes([GOAWAY, 0]) + bytes(4))
    return int.from_bytes(got[at + 10:at + 14], "big") if at >= 0 else None


def test_each_grpc_size_and_count_limit_is_answered_and_counted_once() -> None:
    limits = RouterLimits(connections=3, streams_per_connection=3, header_list_bytes=4096, message_bytes=1 << 20,
                          buffered_bytes=2 << 20, resets_per_second=20)

    async def test(router: GrpcRouter, port: int, stub: pb_grpc.InferenceAPIsServiceStub) -> None:
        hello = PREFACE + settings_frame({})
        # Metadata over the header list limit: that call alone is refused, the one beside it answered.
        big, beside = await asyncio.gather(
            stub.Predictions(req(), metadata=(("x-big", "v" * 5000),), timeout=5),
            stub.Predictions(req(), timeout=5), return_exceptions=True)
        assert isinstance(big, grpc.aio.AioRpcError) and big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "4096-byte header list limit" in big.details()
        assert beside.prediction.startswith(b"m|1.0")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Predictions(req(data=b"x" * (2 << 20)), timeout=5)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than the router's 1 MiB" in err.value.details()
        # Three calls holding 1 MB each: the third passes what the connection may hold.
        held = b"".join(_call_headers(s) + frame(DATA, 0, s, b"\x00" + (999_995).to_bytes(4, "big") + bytes(999_995))
                        for s in (1, 3, 5))
        got = await raw(port, hello + held)
        assert b"grpc-status\x018" in got and b"hold over 2 MiB" in got
        # A fourth call open at once is refused.
        got = await raw(port, hello + b"".join(_call_headers(s) for s in (1, 3, 5, 7)), wait=0.5)
        assert frame(RST_STREAM, 0, 7, h2frames.REFUSED_STREAM.to_bytes(4, "big")) in got
        # 21 calls opened and reset at once in a second: a rapid-reset flood.
        got = await raw(port, hello + b"".join(_call_headers(2 * i + 1) + frame(RST_STREAM, 0, 2 * i + 1, bytes(4))
                                               for i in range(21)))
        assert goaway_code(got) == ENHANCE_YOUR_CALM
        # The channel's connection and two more held: a fourth is closed at accept (UNAVAILABLE).
        others = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
        while len(router.connections) < 3:
            await asyncio.sleep(0.01)
        extra = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=LOCAL)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.InferenceAPIsServiceStub(extra).Predictions(req(), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        await extra.close()
        for _, writer in others:
            writer.close()
        assert (await stub.Predictions(req(), timeout=5)).prediction.startswith(b"m|1.0")
        assert {k: v for k, v in router.counters.counts().items() if v} == {
            "header_list_bytes": 1, "message_bytes": 1, "buffered_bytes": 1, "streams_per_connection": 1,
            "resets_per_second": 1, "connections": 1}

    grpc_run(limits, test)


def test_grpc_deadlines_end_a_trickled_call_and_a_head_never_whole() -> None:
    limits = RouterLimits(head_timeout_s=0.5, body_timeout_s=0.5)

    async def test(router: GrpcRouter, port: int, stub: pb_grpc.InferenceAPIsServiceStub) -> None:
        async def one_message_then_nothing():
            yield req().SerializeToString()
            await asyncio.sleep(30)

        async def trickled() -> grpc.StatusCode:
            try:
                await router_channel.stream_unary(PREDICT)(one_message_then_nothing(), timeout=10)
            except grpc.aio.AioRpcError as exc:
                assert "not received whole within 0.5 s" in exc.details()
                return exc.code()
            return grpc.StatusCode.OK

        router_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=LOCAL)
        started = asyncio.get_running_loop().time()
        code, no_preface, half_block = await asyncio.gather(
            trickled(), raw(port, b"", wait=3), raw(port, PREFACE + settings_frame({}) + frame(HEADERS, 0, 1, b"\x82"), wait=3))
        assert asyncio.get_running_loop().time() - started < 2
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert goaway_code(no_preface) == ENHANCE_YOUR_CALM and goaway_code(half_block) == ENHANCE_YOUR_CALM
        assert b"no whole request head within 0.5 s" in half_block
        await router_channel.close()
        assert (await stub.Predictions(req(), timeout=5)).prediction.startswith(b"m|1.0")
        assert {k: v for k, v in router.counters.counts().items() if v} == {"head_timeout_s": 2, "body_timeout_s": 1}

    grpc_run(limits, test)



def test_a_client_that_opens_its_windows_and_reads_nothing_is_dropped_past_held_bytes() -> None:
    """Its answers and PING ACKs pile up in the router's write buffer; past held_bytes the
    connection (and what it left unread) is dropped, and counted."""
    from tsfleet.router.wire.grpc_wire import GrpcServerConnection
    from tsfleet.router.wire.h2frames import PING

    class Unread(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.unread, self.aborted = 0, False

        def write(self, data: bytes) -> None:
            self.unread += len(data)  # the client takes none of it

        def get_write_buffer_size(self) -> int:
            return self.unread

        def is_closing(self) -> bool:
            return self.aborted

        def abort(self) -> None:
            self.aborted = True

    class Nobody:
        stopping = False

        def opened(self, conn: object, call: object) -> None: ...

        def ended(self, conn: object, call: object) -> None: ...

    async def main() -> tuple[Unread, GrpcServerConnection, LimitCounters]:
        counters = LimitCounters()
        conn = GrpcServerConnection(Nobody(), set(), RouterLimits(held_bytes=4096, pings_per_second=10_000), counters)
        transport = Unread()
        conn.connection_made(transport)
        conn.data_received(PREFACE + settings_frame({}))
        for n in range(400):  # 17 bytes of ACK each, under the PING budget
            conn.data_received(frame(PING, 0, 0, n.to_bytes(8, "big")))
            await asyncio.sleep(0)  # a turn of the loop: what was queued is written
            if transport.aborted:
                break
        return transport, conn, counters

    transport, conn, counters = asyncio.run(main())
    assert transport.aborted and conn.closed
    assert 4096 < transport.unread < 4096 + 200
    assert counters.held_bytes == 1
