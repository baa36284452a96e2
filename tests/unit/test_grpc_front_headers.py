"""What the gRPC front sends upstream of a client's metadata."""
from __future__ import annotations

from tsfleet.router.fronts.grpc_front import PREDICT, GrpcRouter
from tsfleet.router.policy.routing import RoutingTable
from tsfleet.router.wire.grpc_wire import ServerCall


def test_a_client_s_content_length_is_not_forwarded_since_the_version_lengthens_the_message() -> None:
    # h2load and nghttp send one; TorchServe reset every such call before (UNAVAILABLE to the client).
    call = ServerCall(1, [(b":method", b"POST"), (b":path", PREDICT), (b"content-type", b"application/grpc"),
                          (b"content-length", b"42"), (b"te", b"trailers"), (b"authorization", b"Bearer k"),
                          (b"x-user-id", b"u1")])
    sent, sticky = GrpcRouter(RoutingTable({}), "127.0.0.1:7070")._headers(call, PREDICT)
    assert [name for name, _ in sent if name[0] != 58] == [b"content-type", b"te", b"authorization", b"x-user-id",
                                                            b"grpc-timeout"]
    assert sticky == b"u1"  # the sticky key (x-user-id by default), found in the same pass
