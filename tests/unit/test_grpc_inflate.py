"""The gRPC front's bounded decompression (router/wire/grpc_inflate.py), alone and behind a
router's connection: a compressed message is read to at most the message limit."""
from __future__ import annotations

import asyncio
import gzip
import tracemalloc
import zlib

import pytest

from tests.grpc_raw import bomb, call, framed
from tests.unit.test_grpc_wire import req, run
from tsfleet.router.wire.grpc_inflate import MessageTooLarge, NotEncoded, decompress
from tsfleet.router.wire.grpc_wire import GrpcServerConnection

MIB = 1 << 20


@pytest.mark.parametrize("encoding, pack", [(b"gzip", gzip.compress), (b"deflate", zlib.compress)])
def test_a_message_up_to_the_limit_is_read_whole(encoding: bytes, pack) -> None:
    text = bytes(range(256)) * 4096  # 1 MiB
    assert decompress(pack(text), encoding, MIB) == text
    with pytest.raises(MessageTooLarge, match=r"^request larger than the router's 1,023 KiB once decompressed$"):
        decompress(pack(text), encoding, MIB - 1024)


def test_the_limit_is_exact_to_the_byte() -> None:
    assert len(decompress(gzip.compress(b"a" * 1000), b"gzip", 1000)) == 1000
    with pytest.raises(MessageTooLarge, match="999 bytes"):
        decompress(gzip.compress(b"a" * 1000), b"gzip", 999)


def test_gzip_members_one_after_another_are_read_as_gzip_decompress_does() -> None:
    assert decompress(gzip.compress(b"ab") + gzip.compress(b"cd"), b"gzip", 100) == b"abcd"
    with pytest.raises(MessageTooLarge):  # the limit holds for all of them together
        decompress(gzip.compress(b"a" * 60) + gzip.compress(b"b" * 60), b"gzip", 100)


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
def test_a_bomb_costs_at_most_the_limit(encoding: bytes) -> None:
    payload = bomb(1024, encoding.decode())  # 1 GiB of zeros, in about a MB
    assert len(payload) < 2 * MIB
    tracemalloc.start()
    try:
        with pytest.raises(MessageTooLarge, match="8 MiB once decompressed"):
            decompress(payload, encoding, 8 * MIB)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * 8 * MIB, f"{peak / MIB:.0f} MiB held for an 8 MiB limit"


@pytest.mark.parametrize("payload, encoding, words", [
    (b"not gzip at all", b"gzip", "not valid gzip (Error -3 while decompressing data: incorrect header check)"),
    (gzip.compress(b"x" * 100)[:-12], b"gzip", "not valid gzip (truncated)"),
    (gzip.compress(b"x") + b"junk", b"gzip", "not valid gzip (Error -3"),
    (b"\x78\x9c\xff\xff", b"deflate", "not valid deflate"),
    (b"", b"gzip", "not valid gzip (truncated)"),
], ids=["no-gzip", "truncated", "junk-after", "bad-deflate", "empty"])  # gzip's bytes hold its time: stable ids
def test_bytes_that_are_not_the_encoding_are_named_as_such(payload: bytes, encoding: bytes, words: str) -> None:
    with pytest.raises(NotEncoded) as err:
        decompress(payload, encoding, MIB)
    assert str(err.value).startswith("the message is not " + words.split("not ", 1)[1]), str(err.value)


def test_an_encoding_the_router_cannot_read_is_none() -> None:
    assert decompress(b"whatever", b"snappy", MIB) is None
    assert decompress(b"whatever", b"identity", MIB) is None


# ------------------------------------------------------------- behind a router's connection

def test_a_bomb_and_corrupt_bytes_get_their_status_and_the_connection_serves_on(monkeypatch,
                                                                                 channel_box: list) -> None:
    async def test(stub, upstream, table) -> None:
        port, router = channel_box[1], channel_box[2]
        message = req(data=b"z" * 1000).SerializeToString()
        answers = await asyncio.gather(*(asyncio.to_thread(call, port, framed(body), [("grpc-encoding", enc)])
                                         for body, enc in [(bomb(512), "gzip"), (bomb(512, "deflate"), "deflate"),
                                                           (b"garbage", "gzip"), (gzip.compress(message), "gzip")]))
        too_large, deflated, garbage, fine = answers
        assert too_large["grpc-status"] == "8", too_large
        assert too_large["grpc-message"] == "request larger than the router's 4 MiB once decompressed"
        assert deflated["grpc-status"] == "8", deflated
        assert garbage["grpc-status"] == "3", garbage
        assert garbage["grpc-message"].startswith("the message is not valid gzip (Error -3"), garbage
        assert fine["grpc-status"] == "0", fine
        assert router.counters.message_bytes == 2
        assert (await stub.Predictions(req(data=b"z" * 5000))).prediction.startswith(b"m|1.0|None|5000")

    monkeypatch.setattr(GrpcServerConnection, "max_request", 4 * MIB)
    run(test, channel_box=channel_box)


@pytest.fixture
def channel_box() -> list:
    return []
