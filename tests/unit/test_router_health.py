"""The router's own health checks against a TorchServe that accepts connections and never
answers (a frozen frontend): liveness holds, readiness fails within its probe timeout, and a
health request the router cannot read is INVALID_ARGUMENT; and a router on every interface
(as in a pod) with its admin API still on loopback. The live and dead cases, with
TorchServe itself, are in tests/integration/test_router_{rest,grpc}.py."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.conftest import free_ports
from tests.polling import wait_for
from tsfleet.manifest import load_fleet
from tsfleet.router.app import RouterConfig, RouterProcess
from tsfleet.router.fronts.grpc_front import start_grpc_router, stop_grpc_router
from tsfleet.router.fronts.health import PROBE_TIMEOUT_S
from tsfleet.router.fronts.rest import RestRouter
from tsfleet.router.policy.routing import RoutingTable

ROOT = Path(__file__).resolve().parents[2]
SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"


async def _get(port: int, path: str) -> tuple[int, dict]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET %s HTTP/1.1\r\nHost: r\r\n\r\n" % path.encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode().split("\r\n")
    length = next(int(line.split(":")[1]) for line in head if line.lower().startswith("content-length"))
    body = await reader.readexactly(length)
    writer.close()
    return int(head[0].split()[1]), json.loads(body)


async def _frozen() -> tuple[asyncio.Server, int]:
    """Accepts, reads, never answers."""
    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_rest_readiness_fails_within_its_timeout_when_torchserve_does_not_answer() -> None:
    async def main() -> None:
        frozen, upstream = await _frozen()
        router = RestRouter(RoutingTable({}), f"http://127.0.0.1:{upstream}")
        port = await router.start("127.0.0.1", 0)
        try:
            assert await _get(port, "/livez") == (200, {"status": "alive"})
            started = time.monotonic()
            status, body = await _get(port, "/readyz")
            assert time.monotonic() - started < PROBE_TIMEOUT_S + 1
            assert status == 503 and body["type"] == "ServiceUnavailable"
            assert body["message"] == (f"not ready: TorchServe is not reachable at http://127.0.0.1:{upstream}: "
                                       "no answer within 2 s")
        finally:
            await router.stop()
            frozen.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_grpc_readiness_fails_within_its_timeout_and_unreadable_checks_are_invalid() -> None:
    async def main() -> None:
        frozen, upstream = await _frozen()
        router, port = await start_grpc_router(RoutingTable({}), f"127.0.0.1:{upstream}")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        health = health_pb2_grpc.HealthStub(channel)
        try:
            alive = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert alive.status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            answer = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=10)
            assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert time.monotonic() - started < PROBE_TIMEOUT_S + 1
            raw = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=None,
                                      response_deserializer=None)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await raw(b"\x0a\x05ab")  # field 1 says 5 bytes, 2 follow
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cannot read this HealthCheckRequest" in err.value.details()
        finally:
            await channel.close()
            await stop_grpc_router(router, grace=0.5)
            frozen.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_watch_ends_with_unavailable_when_the_router_stops_and_does_not_hold_the_stop() -> None:
    async def main() -> None:
        frozen, upstream = await _frozen()
        router, port = await start_grpc_router(RoutingTable({}), f"127.0.0.1:{upstream}")
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            watching = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=30)
            assert (await watching.read()).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            await stop_grpc_router(router, grace=10)
            assert time.monotonic() - started < 3  # the watch ended; the stop did not wait out its grace
            assert await watching.code() == grpc.StatusCode.UNAVAILABLE
            assert await watching.details() == "the router is stopping"
        finally:
            await channel.close()
            frozen.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_a_router_on_every_interface_answers_probes_and_keeps_its_admin_api_on_loopback(tmp_path) -> None:
    """`tsfleet route --host 0.0.0.0`, as a pod runs it: probes and clients reach the REST and
    gRPC listeners from outside, while the admin API (which changes routes) stays on loopback."""
    async def main() -> None:
        frozen, upstream = await _frozen()
        config = RouterConfig(upstream_rest=f"http://127.0.0.1:{upstream}", upstream_grpc=f"127.0.0.1:{upstream}",
                              host="0.0.0.0", port=0, admin_port=0, grpc_port=0,
                              state_file=tmp_path / "state.json", key_file=tmp_path / "key.json")
        router = RouterProcess(load_fleet(ROOT / "fleet.yaml"), config)
        await router.start()
        try:
            assert router.rest.listener.server.sockets[0].getsockname()[0] == "0.0.0.0"
            assert router._grpc.server.sockets[0].getsockname()[0] == "0.0.0.0"
            assert router._runners[0].addresses[0][0] == "127.0.0.1"
            assert await _get(router.ports["rest"], "/livez") == (200, {"status": "alive"})
        finally:
            await router.stop()
            frozen.close()

    asyncio.run(asyncio.wait_for(main(), 20))


def test_route_takes_the_listeners_address_from_the_command_line(tmp_path) -> None:
    rest, admin, grpc_port = free_ports(3)
    log = tmp_path / "route.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tsfleet", "--manifest", str(ROOT / "fleet.yaml"),
             "--config", str(tmp_path / "none"), "--router-key-file", str(tmp_path / "key.json"),
             "route", "--host", "0.0.0.0", "--port", str(rest),
             "--admin-port", str(admin), "--grpc-port", str(grpc_port), "--state-file", str(tmp_path / "state.json"),
             "--processes", "1"], cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        banner = wait_for("the router's banner", lambda: next(
            (line for line in log.read_text().splitlines() if "router: REST" in line), None) or proc.poll() is not None)
        expected = f"router: REST http://0.0.0.0:{rest}  admin http://127.0.0.1:{admin}  gRPC 0.0.0.0:{grpc_port}"
        assert isinstance(banner, str) and expected in banner, log.read_text()[-2000:]
        assert asyncio.run(asyncio.wait_for(_get(rest, "/livez"), 10)) == (200, {"status": "alive"})
    finally:
        proc.terminate()
        proc.wait(15)
