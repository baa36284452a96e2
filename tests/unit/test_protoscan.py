"""The router reads a large request's model name and version by walking its wire format
(tsfleet/router/wire/protoscan.py): it must read what protobuf reads and refuse what protobuf
refuses, or a request TorchServe cannot parse would be routed (and counted against an arm)."""
from __future__ import annotations

import random

import pytest
from google.protobuf.message import DecodeError

from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.wire.protoscan import request_names


def parsed(data: bytes) -> tuple[str, str] | None:
    try:
        request = pb.PredictionsRequest.FromString(data)
    except DecodeError:
        return None
    return request.model_name, request.model_version


def requests() -> list[bytes]:
    image = bytes(range(256)) * 400
    made = [
        pb.PredictionsRequest(model_name="image-classifier", input={"data": image}),
        pb.PredictionsRequest(model_name="intent-classifier", model_version="1.1",
                              input={"data": b'{"text": "hi"}', "other": b""}, sequence_id="s-1"),
        pb.PredictionsRequest(model_name="modèle ✓", input={"ключ": image[:5000]}),
        pb.PredictionsRequest(),
    ]
    out = [m.SerializeToString() for m in made]
    out.append(out[1] + b"\x12\x031.0")  # a version appended, as the router does: the last one wins
    out.append(out[0] + b"\x28\x07" + b"\x31" + bytes(8) + b"\x3d" + bytes(4))  # unknown varint, fixed64, fixed32
    out.append(out[1] + b"\x33\x08\x01\x34")  # an unknown group (field 6) holding a varint
    out.append(b"\x08\x05" + out[1])  # model_name with another wire type: an unknown field
    return out


@pytest.mark.parametrize("index", range(8))
def test_names_are_read_as_protobuf_reads_them(index: int) -> None:
    data = requests()[index]
    assert request_names(data) == parsed(data) is not None
    assert request_names(memoryview(data)) == parsed(data)


def test_what_protobuf_refuses_is_refused_and_nothing_else() -> None:
    rng = random.Random(7)
    cases = [b"\x00", b"\x0a\x02\xff\xfe", b"\x1a\x06\x0a\x02\xff\xfe\x12\x00", b"\x1a\x03\x0a\x05a",
             b"\x22\x01\xff", b"\x0a\x80\x80\x80\x80\x10", b"\x1b", b"\x1b\x24", b"\x0f", b"\x0a" + b"\xff" * 11]
    for data in filter(None, requests()):
        for _ in range(300):
            mutated = bytearray(data[:600] if len(data) > 600 else data)
            for _ in range(rng.randint(1, 3)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            cases.append(bytes(mutated[:rng.randint(0, len(mutated))] if rng.random() < 0.3 else mutated))
    refused = 0
    for data in cases:
        assert request_names(data) == parsed(data), data
        refused += parsed(data) is None
    assert refused > 200  # the mutations did reach the parser's errors, not only harmless bytes
