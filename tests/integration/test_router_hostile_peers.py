"""Hostile peers against a router process in front of a real TorchServe, over raw sockets.

HTTP/1.1: request smuggling. Bytes that Netty (TorchServe's frontend) would read as a second
request are never forwarded, so no client's answer can reach another client over a pooled
upstream connection. Before the router refused them, the first case's client asked
text-embedder and was answered by intent-classifier: the hidden request had reached
TorchServe as a request of its own.

HTTP/2: a malformed frame closes that connection with RFC 9113's GOAWAY, and the process goes
on serving everyone else (SETTINGS_MAX_FRAME_SIZE = 0 once froze its event loop); RFC 9113's
other conformance cases are test_router_hostile_h2.py's (helpers: hostile_peers.py)."""
from __future__ import annotations

import json
import socket
import struct

import grpc
import pytest
import requests

from tests.integration.hostile_peers import PREDICTIONS, healthy, raw_exchange, router  # noqa: F401 (a fixture)
from tsfleet.router.wire.h2frames import GOAWAY, PREFACE, PROTOCOL_ERROR, S_MAX_FRAME_SIZE, settings_frame
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration


def smuggling(key: str, separator: bytes) -> bytes:
    """A request to text-embedder whose X-A value hides a Transfer-Encoding header, and whose
    body, read as chunked, ends at once and leaves a second request to intent-classifier."""
    doc = b'{"text": "cancel my plan"}'
    hidden = (b"POST /predictions/intent-classifier HTTP/1.1\r\nHost: ts\r\nAuthorization: Bearer " + key.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(doc) + doc)
    body = b"0\r\n\r\n" + hidden
    return (b"POST /predictions/text-embedder HTTP/1.1\r\nHost: router\r\nAuthorization: Bearer " + key.encode()
            + b"\r\nContent-Type: application/json\r\nX-A: b" + separator + b"Transfer-Encoding: chunked\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body) + body)


@pytest.mark.parametrize("separator", [b"\n", b"\r", b"\x00"], ids=["LF", "CR", "NUL"])
def test_a_hidden_header_is_refused_and_no_answer_reaches_another_client(router, server, separator) -> None:
    key = server.keys.inference
    answer = raw_exchange(router.url, smuggling(key, separator))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head, answer[:300]
    assert "control character" in json.loads(body)["message"]
    # Every other client gets its own model's answer: nothing was left on an upstream connection.
    session = requests.Session()
    for _ in range(20):
        resp = session.post(router.url + "/predictions/text-embedder", json={"text": "hello"},
                            headers={"Authorization": f"Bearer {key}"}, timeout=30)
        assert resp.status_code == 200 and len(resp.json()["embedding"]) == 384, resp.text[:200]


@pytest.mark.parametrize("value", [0, 1, 2**24])
def test_a_frame_size_out_of_range_is_a_goaway_and_the_process_serves_on(router, server, value) -> None:
    pid = router.proc.pid
    host, port = router.grpc.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(PREFACE + settings_frame({S_MAX_FRAME_SIZE: value}))
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            pass
    at = got.find(bytes([GOAWAY, 0]) + bytes(4))  # type GOAWAY, no flags, stream 0
    assert at >= 0 and struct.unpack(">I", got[at + 10:at + 14])[0] == PROTOCOL_ERROR, got[:200]
    healthy(router, server.keys.inference)
    assert router.proc.pid == pid


@pytest.mark.parametrize("message", [b"\xff\xfe\xfd\xfc", b"\x0a\x05ab", b"\x0a\x02\xff\xfe", bytes(range(256))],
                         ids=["random", "truncated-field", "name-not-utf8", "every-byte"])
def test_bytes_that_are_no_predictions_request_are_invalid_argument(router, server, message) -> None:
    """TorchServe answers these UNKNOWN or INTERNAL (a server fault); the router says whose fault it is."""
    auth = (("authorization", f"Bearer {server.keys.inference}"),)
    with grpc.insecure_channel(router.grpc) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary(PREDICTIONS)(message, metadata=auth, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "not a PredictionsRequest" in err.value.details()
    healthy(router, server.keys.inference)


@pytest.mark.parametrize("model,version", [("no-such-model", ""), ("intent-classifier", "9.9")])
def test_an_unknown_model_or_version_is_not_found(router, server, model, version) -> None:
    auth = (("authorization", f"Bearer {server.keys.inference}"),)
    request = pb.PredictionsRequest(model_name=model, model_version=version, input={"data": b'{"text": "hi"}'})
    with grpc.insecure_channel(router.grpc) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.InferenceAPIsServiceStub(channel).Predictions(request, metadata=auth, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND, (err.value.code(), err.value.details())
    with grpc.insecure_channel(f"127.0.0.1:{server.ep.grpc_inference}") as channel:  # TorchServe itself
        with pytest.raises(grpc.RpcError) as direct:
            pb_grpc.InferenceAPIsServiceStub(channel).Predictions(request, metadata=auth, timeout=10)
    assert direct.value.code() == grpc.StatusCode.INTERNAL and "NotFoundException" in direct.value.details()


@pytest.mark.parametrize("content_type,body", [
    ("application/x-www-form-urlencoded", b"a=%"),
    ("application/x-www-form-urlencoded", b"&&&"),
], ids=["lone-percent", "empty-pairs"])
def test_a_form_torchserve_cannot_read_is_the_client_s_400_through_the_router(router, server, content_type,
                                                                               body) -> None:
    """TorchServe's frontend answers these 500 naming its own Java exception (a server fault
    to any client or alert); the router says whose fault it is, and what TorchServe said."""
    headers = {"Authorization": f"Bearer {server.keys.inference}", "Content-Type": content_type}
    direct = requests.post(server.ep.url("inference") + "/predictions/intent-classifier", data=body,
                           headers=headers, timeout=10)
    routed = requests.post(router.url + "/predictions/intent-classifier", data=body, headers=headers, timeout=10)
    assert direct.status_code == 500 and direct.json()["type"] in ("ErrorDataDecoderException",
                                                                   "StringIndexOutOfBoundsException")
    assert routed.status_code == 400, routed.text
    assert routed.json()["message"].startswith("the form body could not be read"), routed.text
    healthy(router, server.keys.inference)
