"""What the gRPC front sends upstream of a client's metadata."""
from __future__ import annotations

import json
import time
from datetime import datetime, timedelta
from pathlib import Path

from tsfleet.router.fronts.grpc_front import PREDICT, GrpcRouter
from tsfleet.router.keys import InferenceKeys, read_upstream_key
from tsfleet.router.policy.routing import RoutingTable
from tsfleet.router.wire.grpc_wire import ServerCall
from tsfleet.router.wire.hpack_codec import encode


def test_a_client_s_content_length_is_not_forwarded_since_the_version_lengthens_the_message() -> None:
    # h2load and nghttp send one; TorchServe reset every such call before (UNAVAILABLE to the client).
    call = ServerCall(1, [(b":method", b"POST"), (b":path", PREDICT), (b"content-type", b"application/grpc"),
                          (b"content-length", b"42"), (b"te", b"trailers"), (b"authorization", b"Bearer k"),
                          (b"x-user-id", b"u1")])
    sent, sticky = GrpcRouter(RoutingTable({}), "127.0.0.1:7070")._headers(call, PREDICT)
    assert [name for name, _ in sent if name[0] != 58] == [b"content-type", b"te", b"authorization", b"x-user-id",
                                                            b"grpc-timeout"]
    assert sticky == b"u1"  # the sticky key (x-user-id by default), found in the same pass


# ------------------------------------------------ what a connection remembers (_forwarded)
class _Conn:
    remembered = None


def _call(headers: list) -> ServerCall:
    return ServerCall(1, headers)


def _key_file(path: Path, key: str) -> Path:
    path.write_text(json.dumps({"inference": {"key": key, "expiration time": (
        datetime.now() + timedelta(seconds=600)).isoformat()}, "API": {"key": "api"}, "management": {"key": "m"}}))
    return path


def _authorization(sent: list) -> bytes:
    return next(value for name, value in sent if name == b"authorization")


def test_a_connection_s_repeated_metadata_is_built_and_encoded_once_and_a_new_list_is_not_mistaken() -> None:
    router, conn = GrpcRouter(RoutingTable({}), "127.0.0.1:7070"), _Conn()
    same = [(b":path", PREDICT), (b"te", b"trailers"), (b"x-user-id", b"u1")]
    first, second, third = (router._forwarded(conn, _call(same), False) for _ in range(3))
    assert first[0] == second[0] == third[0] == router._headers(_call(same), PREDICT)[0]
    assert third[0] is second[0] and encode(third[0]) == encode(list(third[0]))  # remembered, same bytes
    assert third[1] == b"u1"
    # A list equal in content but not the decoder's same one, then another client's metadata.
    other = [(b":path", PREDICT), (b"te", b"trailers"), (b"x-user-id", b"u2")]
    assert router._forwarded(conn, _call(other), False)[1] == b"u2"
    assert router._forwarded(conn, _call(list(same)), False)[0] is not second[0]
    # Decompressed by the router: the client's grpc-encoding no longer holds.
    zipped = [(b":path", PREDICT), (b"grpc-encoding", b"gzip")]
    router._forwarded(conn, _call(zipped), False)
    assert (b"grpc-encoding", b"gzip") in router._forwarded(conn, _call(zipped), False)[0]
    assert (b"grpc-encoding", b"gzip") not in router._forwarded(conn, _call(zipped), True)[0]


def test_what_a_connection_remembers_follows_key_rotations_renewals_and_the_end_of_a_grace(
        tmp_path: Path, monkeypatch) -> None:
    keys = InferenceKeys("router-key", _key_file(tmp_path / "key_file.json", "ts-key"), "http://127.0.0.1:1")
    router, conn = GrpcRouter(RoutingTable({}), "127.0.0.1:7070", keys=keys), _Conn()
    old = [(b":path", PREDICT), (b"authorization", b"Bearer router-key")]
    for _ in range(3):
        assert _authorization(router._forwarded(conn, _call(old), False)[0]) == b"Bearer ts-key"
    keys.current = read_upstream_key(_key_file(tmp_path / "key_file.json", "ts-key-2"))  # renewed
    assert _authorization(router._forwarded(conn, _call(old), False)[0]) == b"Bearer ts-key-2"
    keys.take("new-key", [("router-key", time.time() + 30)])  # rotated: the old key for its grace
    for _ in range(3):
        assert _authorization(router._forwarded(conn, _call(old), False)[0]) == b"Bearer ts-key-2"
    monkeypatch.setattr(time, "time", lambda: 10**10)  # the grace is over: the old key is no longer swapped
    for _ in range(2):
        assert _authorization(router._forwarded(conn, _call(old), False)[0]) == b"Bearer router-key"
    new = [(b":path", PREDICT), (b"authorization", b"Bearer new-key")]
    for _ in range(3):
        assert _authorization(router._forwarded(conn, _call(new), False)[0]) == b"Bearer ts-key-2"
    keys.take("other-key")  # rotated again without grace: the newer key is no longer swapped either
    assert _authorization(router._forwarded(conn, _call(new), False)[0]) == b"Bearer new-key"
