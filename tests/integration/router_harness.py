"""Run a router (REST, admin, gRPC) in a background event loop for the tests."""
from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import requests

from tsfleet.manifest import Fleet
from tsfleet.router.app import RouterConfig, RouterProcess


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


class RunningRouter:
    """A started RouterProcess plus small HTTP helpers."""

    def __init__(self, fleet: Fleet, workdir: Path, upstream_rest: str, upstream_grpc: str, processes: int = 1):
        self.loop = LoopThread()
        config = RouterConfig(upstream_rest=upstream_rest, upstream_grpc=upstream_grpc, port=0, admin_port=0,
                              grpc_port=0, state_file=workdir / "router_state.json",
                              key_file=workdir / "router_key.json", processes=processes)
        self.process = RouterProcess(fleet, config)
        self.loop.run(self.process.start())
        self.table = self.process.table
        self.url = f"http://127.0.0.1:{self.process.ports['rest']}"
        self.grpc_target = f"127.0.0.1:{self.process.ports['grpc']}"
        self.admin_url = f"http://127.0.0.1:{self.process.ports['admin']}"
        self.admin_headers = {"Authorization": f"Bearer {self.process.admin.key}"}
        self.session = requests.Session()

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> requests.Response:
        return self.session.post(self.url + path, data=body, headers=headers, timeout=60)

    def admin(self, method: str, path: str, **kw: Any) -> requests.Response:
        return requests.request(method, self.admin_url + path, headers=self.admin_headers, timeout=30, **kw)

    def stop(self) -> None:
        self.loop.run(self.process.stop())
        self.loop.close()
