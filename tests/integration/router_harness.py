"""Run a router (REST, admin, gRPC) in a background event loop for the tests."""
from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from pathlib import Path
from typing import Any, Iterator

import requests

from benchmarks.speed.workload import camera_jpeg

from tsfleet.manifest import Fleet
from tsfleet.router.app import RouterConfig, RouterProcess
from tsfleet.control.server import TorchServe


def camera_image() -> bytes:
    """A 1024 x 1024 camera-like JPEG of a triangle (about 430 KB, the benchmark's kind):
    the router reads it over several socket reads."""
    return camera_jpeg("triangle", random.Random(0), 1024)


class LoopThread:
    """An asyncio loop on its own thread, so synchronous tests can drive async servers."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


class Forwarder:
    """Passes every connection to 127.0.0.1:``port`` on to ``to_port`` byte for byte: a
    server that comes back at an address the router found dead. Run it on the router's loop."""

    def __init__(self, to_port: int):
        self.to_port = to_port
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self, port: int) -> "Forwarder":
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", port)
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.to_port)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            writer.close()
            self.tasks.discard(task)

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()


class RunningRouter:
    """A started RouterProcess plus small HTTP helpers."""

    def __init__(self, fleet: Fleet, workdir: Path, upstream_rest: str, upstream_grpc: str, processes: int = 1,
                 **options: Any):
        self.loop = LoopThread()
        config = RouterConfig(upstream_rest=upstream_rest, upstream_grpc=upstream_grpc, port=0, admin_port=0,
                              grpc_port=0, state_file=workdir / "router_state.json",
                              key_file=workdir / "router_key.json", processes=processes, **options)
        self.process = RouterProcess(fleet, config)
        self.loop.run(self.process.start())
        self.table = self.process.table
        self.url = f"http://127.0.0.1:{self.process.ports['rest']}"
        self.grpc_target = f"127.0.0.1:{self.process.ports['grpc']}"
        self.admin_url = f"http://127.0.0.1:{self.process.ports['admin']}"
        self.admin_headers = {"Authorization": f"Bearer {self.process.admin.key}"}
        self.session = requests.Session()

    @classmethod
    def before(cls, server: TorchServe, fleet: Fleet, workdir: Path, keyed: bool = True, **options: Any) -> "RunningRouter":
        """A router in front of ``server``; ``keyed``: with TorchServe's key file and
        management API, as ``up`` starts it (its own key, renewals, readiness by model)."""
        if keyed:
            options.update(upstream_management=server.ep.url("management"), ts_key_file=server.workdir / "key_file.json")
        return cls(fleet, workdir, server.ep.url("inference"), f"127.0.0.1:{server.ep.grpc_inference}", **options)

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> requests.Response:
        return self.session.post(self.url + path, data=body, headers=headers, timeout=60)

    def admin(self, method: str, path: str, **kw: Any) -> requests.Response:
        return requests.request(method, self.admin_url + path, headers=self.admin_headers, timeout=30, **kw)

    def stop(self) -> None:
        self.loop.run(self.process.stop())
        self.loop.close()

    def __enter__(self) -> "RunningRouter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


SENTENCES = [("please cancel my subscription", "cancel"), ("what will the weather be like tomorrow", "weather"),
             ("book a train to Vienna", "travel")]


class SteadyLoad:
    """Closed-loop clients of the intent classifier that check every answer until stopped;
    failures are kept whole."""

    def __init__(self, url: str, headers: dict[str, str], clients: int):
        self.url, self.headers = url, {**headers, "Content-Type": "application/json"}
        self.stop, self.ok, self.failures = threading.Event(), 0, []
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(clients)]

    def _client(self, i: int) -> None:
        session, n = requests.Session(), i
        while not self.stop.is_set():
            text, intent = SENTENCES[n % len(SENTENCES)]
            n += 1
            try:
                resp = session.post(self.url, json={"text": text}, headers=self.headers, timeout=30)
                good = resp.status_code == 200 and resp.json().get("intent") == intent
                detail = f"{resp.status_code} {resp.text[:200]}"
            except requests.RequestException as exc:
                good, detail = False, repr(exc)
            with self._lock:
                if good:
                    self.ok += 1
                else:
                    self.failures.append(detail)

    def __enter__(self) -> "SteadyLoad":
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(60)


@contextlib.contextmanager
def served(fleet: Fleet, model_store: Path, workdir: Path, keyed: bool = False,
           **router_options: Any) -> Iterator[tuple[TorchServe, RunningRouter]]:
    """A TorchServe of its own serving ``fleet``, and a router before it (``router_options``:
    more of its RouterConfig); both stopped after."""
    from tests.integration.conftest import new_server

    ts = new_server(fleet, model_store, workdir)
    ts.start(snapshots=False)
    try:
        ts.wait_ready(fleet, timeout=300, progress=lambda line: None)
        with RunningRouter.before(ts, fleet, workdir, keyed, **router_options) as router:
            yield ts, router
    finally:
        ts.stop()
