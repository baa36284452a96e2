"""The soak's clients: a closed loop of N concurrent clients through the router, each sending
its requests to every path in turn (REST and gRPC for each model, and the workflow over REST),
with the request bodies the speed suite uses. Every answer is checked and recorded.

They run on one asyncio loop in a thread of their own, so the soak's sampler and its timeline
(the kill, the canary) run beside them in the main process.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from benchmarks.speed.workload import sentences, shape_images

TIMEOUT_S = 60.0  # an answer slower than this counts as a failed request
GRPC_CONNECTIONS = 4  # as several client processes would open
KEPT_ERRORS = 100  # the first failures, with what each was told


@dataclass(frozen=True)
class Target:
    """One path to one model: ``name`` for tables, ``field`` the key a good answer carries."""

    name: str
    model: str
    protocol: str  # "REST" or "gRPC"
    path: str  # REST: the URL path; gRPC: the model name
    content_type: str
    bodies: tuple[bytes, ...]
    field: str


def targets() -> list[Target]:
    texts = tuple(json.dumps({"text": s}).encode() for s in sentences())
    images = tuple(shape_images())
    out = []
    for model, bodies, ctype, field in (("text-embedder", texts, "application/json", "embedding"),
                                         ("intent-classifier", texts, "application/json", "intent"),
                                         ("image-classifier", images, "image/png", "label")):
        out.append(Target(f"{model} REST", model, "REST", f"/predictions/{model}", ctype, bodies, field))
        out.append(Target(f"{model} gRPC", model, "gRPC", model, ctype, bodies, field))
    out.append(Target("intent-pipeline REST (workflow)", "intent-pipeline", "REST", "/wfpredict/intent-pipeline",
                      "application/json", texts, "intent"))
    return out


# One answered request: (seconds since t0 when it ended, latency s, target index,
# failure kind or "", the version that answered or "").
Record = tuple[float, float, int, str, str]
Call = Callable[[Target, bytes], Awaitable[tuple[str, str, str]]]  # -> (failure kind, detail, version)


def _rest_check(target: Target, status: int, data: bytes) -> tuple[str, str]:
    if status != 200:
        return f"REST {status}", data[:200].decode(errors="replace")
    try:
        if target.field in json.loads(data):
            return "", ""
    except ValueError:
        pass
    return f"REST 200 without '{target.field}'", data[:200].decode(errors="replace")


def _grpc_check(target: Target, prediction: bytes) -> tuple[str, str]:
    """TorchServe answers a handler's error over gRPC with status OK and its JSON error body."""
    try:
        doc = json.loads(prediction)
    except ValueError:
        doc = None
    if isinstance(doc, dict) and target.field in doc:
        return "", ""
    code = doc.get("code") if isinstance(doc, dict) else None
    return (f"gRPC OK/{code}" if code else f"gRPC OK without '{target.field}'"), prediction[:200].decode(errors="replace")


class Load:
    """``clients`` clients until ``deadline`` (time.monotonic()), ``stop`` or ``max_requests``."""

    def __init__(self, rest_url: str, grpc_target: str, key: str, clients: int, deadline: float,
                 max_requests: int, t0: float):
        self.rest_url, self.grpc_target, self.key = rest_url, grpc_target, key
        self.clients, self.deadline, self.max_requests, self.t0 = clients, deadline, max_requests, t0
        self.targets = targets()
        self.records: list[Record] = []
        self.errors: list[str] = []  # "12.3 s: target: kind: detail", the first KEPT_ERRORS
        self.sent = 0
        self.stop = threading.Event()
        self.crashed: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="soak-load", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _main(self) -> None:
        try:
            asyncio.run(self.run())
        except BaseException as exc:  # noqa: BLE001 - reported by the soak, not lost in a thread
            self.crashed = exc

    async def run(self) -> None:
        import aiohttp
        import grpc

        from tsfleet.router.proto import inference_pb2, inference_pb2_grpc

        auth = f"Bearer {self.key}"
        metadata = (("authorization", auth),)
        connector = aiohttp.TCPConnector(limit=self.clients)
        timeout = aiohttp.ClientTimeout(total=TIMEOUT_S)
        # Each channel its own TCP connection, as separate client processes would have.
        channels = [grpc.aio.insecure_channel(self.grpc_target, options=[("grpc.use_local_subchannel_pool", 1)])
                    for _ in range(GRPC_CONNECTIONS)]
        stubs = [inference_pb2_grpc.InferenceAPIsServiceStub(c) for c in channels]
        turn = itertools.count()  # calls go to the connections in turn
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

            async def rest(target: Target, body: bytes) -> tuple[str, str, str]:
                headers = {"Authorization": auth, "Content-Type": target.content_type}
                try:
                    async with http.post(self.rest_url + target.path, data=body, headers=headers) as resp:
                        data = await resp.read()
                        kind, detail = _rest_check(target, resp.status, data)
                        return kind, detail, resp.headers.get("X-Model-Version", "")
                except asyncio.TimeoutError:
                    return "REST timeout", f"no answer within {TIMEOUT_S:.0f} s", ""
                except aiohttp.ClientError as exc:
                    return f"REST {type(exc).__name__}", str(exc)[:200], ""

            async def rpc(target: Target, body: bytes) -> tuple[str, str, str]:
                call = stubs[next(turn) % len(stubs)].Predictions(
                    inference_pb2.PredictionsRequest(model_name=target.path, input={"data": body}),
                    metadata=metadata, timeout=TIMEOUT_S)
                try:
                    reply = await call
                    version = dict(await call.initial_metadata()).get("x-model-version", "")
                except grpc.aio.AioRpcError as err:
                    return f"gRPC {err.code().name}", (err.details() or "")[:200], ""
                kind, detail = _grpc_check(target, reply.prediction)
                return kind, detail, str(version)

            try:
                await asyncio.gather(*(self._client(k, rest, rpc) for k in range(self.clients)))
            finally:
                for channel in channels:
                    await channel.close()

    async def _client(self, k: int, rest: Call, rpc: Call) -> None:
        n = len(self.targets)
        i = k  # clients start on different paths, so every path is loaded from the first second
        while not self.stop.is_set() and time.monotonic() < self.deadline and self.sent < self.max_requests:
            self.sent += 1
            which = i % n
            target = self.targets[which]
            body = target.bodies[(i // n) % len(target.bodies)]
            i += 1
            started = time.perf_counter()
            kind, detail, version = await (rest if target.protocol == "REST" else rpc)(target, body)
            ended = time.monotonic() - self.t0
            self.records.append((ended, time.perf_counter() - started, which, kind, version))
            if kind and len(self.errors) < KEPT_ERRORS:
                self.errors.append(f"{ended:.1f} s: {target.name}: {kind}: {detail}")
