"""The fleet every tier that runs a real TorchServe shares: archives, one TorchServe, a router.

Loaded once, from tests/conftest.py (``pytest_plugins``), so tests/integration and
tests/reliability see the same session-scoped fixtures and a run that takes both folders
starts ONE TorchServe. A fixture defined in a folder's conftest would be a second definition
with a server of its own. tests/unit must never start TorchServe (``make test-fast``): a
unit test that asks for one of these fixtures fails before anything is started.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

from tsfleet.build.archive import Builder
from tsfleet.manifest import Fleet, load_fleet
from tsfleet.control.server import TorchServe

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the kernel says are free right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Client:
    """Small REST client for one test server; sends the inference key unless told not to."""

    def __init__(self, server: TorchServe, fleet: Fleet):
        self.server, self.fleet = server, fleet
        self.session = requests.Session()

    @property
    def inference_url(self) -> str:
        return self.server.ep.url("inference")

    def post(self, path: str, data: Any = None, *, content_type: str | None = "application/json",
             key: str | None = "inference", headers: dict | None = None, **kw: Any) -> requests.Response:
        hdrs = dict(headers or {})
        if key:
            hdrs.update(self.server.keys.header(key))
        if content_type:
            hdrs["Content-Type"] = content_type
        if isinstance(data, (dict, list)):
            data = json.dumps(data)
        return self.session.post(self.inference_url + path, data=data, headers=hdrs, timeout=60, **kw)

    def predict(self, model: str, data: Any = None, version: str | None = None, **kw: Any) -> requests.Response:
        return self.post(f"/predictions/{model}" + (f"/{version}" if version else ""), data, **kw)

    def metrics(self) -> str:
        return requests.get(self.server.ep.url("metrics") + "/metrics", timeout=10).text


def new_server(fleet: Fleet, model_store: Path, workdir: Path, load_models: bool = True) -> TorchServe:
    """A TorchServe of its own (free ports, private temp dir, auth on), not yet started."""
    return TorchServe.isolated(fleet, model_store, workdir, load_models)


# The fixtures below start (or build for) a real TorchServe.
STARTS_TORCHSERVE = frozenset({"model_store", "server", "client", "headers", "fleet_router"})


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # tryfirst: before pytest's own setup fills the fixtures, so nothing has started yet.
    from tests.conftest import folder_tier

    wanted = STARTS_TORCHSERVE & set(getattr(item, "fixturenames", ()))
    if folder_tier(item.path) == "unit" and wanted:
        pytest.fail(f"a unit test may not start TorchServe (it asks for {', '.join(sorted(wanted))}): "
                    "move it to tests/integration or tests/reliability", pytrace=False)


@pytest.fixture(scope="session")
def fleet() -> Fleet:
    return load_fleet(ROOT / "fleet.yaml")


@pytest.fixture(scope="session")
def model_store(fleet: Fleet) -> Path:
    store = ROOT / "model_store"
    Builder(fleet, store, ROOT / "build" / "artifacts", progress=lambda line: None).build_all()
    return store


@pytest.fixture(scope="session")
def server(fleet: Fleet, model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TorchServe]:
    ts = new_server(fleet, model_store, tmp_path_factory.mktemp("torchserve"))
    ts.start(snapshots=False)
    try:
        ts.wait_ready(fleet, timeout=300, progress=lambda line: None)
        ts.register_workflows(fleet)
        yield ts
    finally:
        ts.stop()


@pytest.fixture(scope="session")
def client(server: TorchServe, fleet: Fleet) -> Client:
    return Client(server, fleet)


@pytest.fixture
def headers(server: TorchServe) -> dict[str, str]:
    """The inference key and a JSON body's content type, for tests that post by hand."""
    return {**server.keys.header("inference"), "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def fleet_router(fleet: Fleet, server: TorchServe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A router before the session's TorchServe as ``up`` starts it (its own keys, TorchServe's
    key file and management API), stopped after the module. Modules that need a router set
    up otherwise define their own ``router``."""
    from tests.integration.router_harness import RunningRouter

    with RunningRouter.before(server, fleet, tmp_path_factory.mktemp("router")) as r:
        yield r
