"""The gRPC front's streamed calls: StreamPredictions (one request, answers relayed as they
come) and StreamPredictions2 (a sequence of requests, one version for all of it), each a task
of its own; the unary Predictions call is grpc_predict.py's, on callbacks."""
from __future__ import annotations

from typing import TYPE_CHECKING

from grpc import StatusCode

from tsfleet.router.fronts.grpc_predict import outcome
from tsfleet.router.policy.attempts import DROPPED, RETRY, RoutingPolicy
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.wire.grpc_answers import Relay
from tsfleet.router.wire.grpc_upstream import GrpcUpstreamPool, UpstreamCall
from tsfleet.router.wire.grpc_wire import (GRPC_TYPE, STATUS_OK, GrpcServerConnection, ServerCall, UpstreamGone, header,
                                           split_messages, status_trailers)
from tsfleet.router.wire.h2frames import Data
from tsfleet.router.wire.hpack_codec import Header
from tsfleet.router.wire.limits import LimitCounters

SERVICE = b"/org.pytorch.serve.grpc.inference.InferenceAPIsService/"
PREDICT, STREAM, SEQUENCE, PING = (SERVICE + m for m in (b"Predictions", b"StreamPredictions",
                                                         b"StreamPredictions2", b"Ping"))


class StreamCalls:
    """GrpcRouter's streamed calls (a base class: they use its pool, policy and helpers)."""

    policy: RoutingPolicy
    pool: GrpcUpstreamPool
    sticky: bytes
    max_held: int
    counters: LimitCounters

    if TYPE_CHECKING:  # GrpcRouter's, declared for the type checker only
        def _headers(self, call: ServerCall, path: bytes, decompressed: bool = False) -> tuple[list[Header], bytes | None]: ...

        def _request(self, call: ServerCall, flag: int, payload: bytes | memoryview) -> pb.PredictionsRequest | None: ...

        def message_for(self, model: str, payload: bytes | memoryview, version: str | None,
                        whole: bool = False) -> Data: ...

        async def _call(self, call: ServerCall, headers: list[Header], data: Data,
                        sink: Relay | None = None) -> UpstreamCall: ...

        def unreachable(self, exc: Exception | None) -> str: ...

    async def _stream(self, conn: GrpcServerConnection, call: ServerCall, model: str, asked: str,
                      payload: bytes | memoryview, decompressed: bool) -> None:
        headers = self._headers(call, STREAM, decompressed)[0]
        sticky = header(call.headers, self.sticky)
        routed = self.policy.begin(model, asked, sticky.decode("latin-1") if sticky else None)
        relay = Relay(conn, call, [])
        try:
            while True:
                relay.extra = [(b"x-model-version", routed.version.encode())] if routed.version else []
                try:
                    up = await self._call(call, headers, self.message_for(model, payload, routed.version), relay)
                except UpstreamGone as exc:
                    if call.cancelled:
                        return
                    # Only an unreachable TorchServe is retried, and only before any answer:
                    # 0.12 answers "Worker died." (and restarts the worker) when a handler does
                    # not stream, so retrying that would take down a second worker.
                    if not relay.started and self.policy.after(routed, DROPPED) == RETRY:
                        continue
                    self.policy.answered(routed, DROPPED, mirror=False)
                    relay.fail(StatusCode.UNAVAILABLE, self.unreachable(exc))
                    return
                self.policy.answered(routed, outcome(*up.status()), mirror=False)  # streams are not mirrored
                return
        finally:
            conn.finish(call)

    async def _relay(self, conn: GrpcServerConnection, call: ServerCall) -> None:
        """A call that streams requests: StreamPredictions2 (one version for the whole
        sequence, no retries), or a method the router does not know (passed through)."""
        assert call.queue is not None
        try:
            rewrite, pending, version, model = call.path == SEQUENCE, bytearray(), None, ""
            first: list[bytes] = []
            if rewrite:
                while not (messages := split_messages(pending)):
                    chunk = await call.queue.get()
                    if chunk is None:
                        break
                    pending += chunk
                if call.cancelled:
                    return
                if not messages:  # the client ended the sequence before sending anything
                    conn.send(call.id, [STATUS_OK, GRPC_TYPE], trailers=status_trailers(StatusCode.OK, ""))
                    return
                requests = [self._request(call, f, p) for f, p in messages]
                if any(r is None for r in requests):
                    conn.send(call.id, [STATUS_OK, GRPC_TYPE], trailers=status_trailers(
                        StatusCode.UNIMPLEMENTED, "the router cannot read this sequence's messages"))
                    return
                model = requests[0].model_name
                sticky = header(call.headers, self.sticky)
                version = self.policy.begin(model, requests[0].model_version, sticky.decode("latin-1") if sticky else None).version
                first = [self.message_for(model, r.SerializeToString(), version, whole=True) for r in requests]
            relay = Relay(conn, call, [(b"x-model-version", version.encode())] if version else [])
            try:
                upstream = await self.pool.connection()
            except UpstreamGone as exc:
                relay.fail(StatusCode.UNAVAILABLE, self.unreachable(exc))
                return
            up = upstream.start(self._headers(call, call.path, decompressed=rewrite)[0],
                                b"".join(first) or None, False, relay)
            call.upstream = (upstream, up.id)
            while (chunk := await call.queue.get()) is not None:
                if rewrite:
                    pending += chunk
                    requests = [self._request(call, f, p) for f, p in split_messages(pending)]
                    if any(r is None for r in requests):
                        upstream.fail(up.id, UpstreamGone("unreadable message"), reset=True)
                        relay.fail(StatusCode.UNIMPLEMENTED, "the router cannot read this sequence's messages")
                        return
                    chunk = b"".join(self.message_for(model, r.SerializeToString(), version, whole=True)
                                     for r in requests)
                if chunk:
                    upstream.send(up.id, data=chunk)
                    if upstream.held(up.id) > self.max_held:
                        upstream.fail(up.id, UpstreamGone("unread"), reset=True)
                        up.done.exception()  # seen: nobody else waits for this call now
                        self.counters.held_bytes += 1
                        relay.fail(StatusCode.RESOURCE_EXHAUSTED, f"TorchServe has not read the last "
                                   f"{self.max_held >> 20} MiB of this stream; the router holds no more")
                        return
            if call.cancelled:
                return
            upstream.send(up.id, data=b"", end=True)
            try:
                await up.done
            except UpstreamGone as exc:
                relay.fail(StatusCode.UNAVAILABLE, self.unreachable(exc))
        finally:
            call.upstream = None
            conn.finish(call)
