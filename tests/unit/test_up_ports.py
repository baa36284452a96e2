"""`tsfleet up --router-port/--router-grpc-port/--router-admin-port`: the router `up` starts
listens where it is told (two fleets, or a test beside a fleet, on one machine), and `up`
keeps using that admin API when TorchServe comes back. A real `up` on free ports is in
tests/reliability/test_faults_under_load.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from tsfleet import cli

from tsfleet.control import companions

from tsfleet.control import up
from tsfleet.manifest import Fleet
from tsfleet.build.properties import Endpoints


def options_of(monkeypatch: pytest.MonkeyPatch, *argv: str) -> up.UpOptions:
    """What `tsfleet up <argv>` hands to up.run."""
    seen: list[up.UpOptions] = []
    monkeypatch.setattr(cli, "_server", lambda args: None)
    monkeypatch.setattr(up, "run", lambda server, fleet, options, say: seen.append(options) or 0)
    assert cli.main(["up", "--no-build", *argv]) == 0
    return seen[0]


def test_the_router_s_ports_default_to_8090_7090_and_8091(monkeypatch: pytest.MonkeyPatch) -> None:
    options = options_of(monkeypatch)
    assert (options.router_port, options.router_grpc_port, options.router_admin_port) == (8090, 7090, 8091)
    assert options.router_admin == up.ROUTER_ADMIN == "http://127.0.0.1:8091"


def test_up_starts_the_router_on_the_ports_it_is_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    options = options_of(monkeypatch, "--router-port", "18090", "--router-grpc-port", "17090",
                         "--router-admin-port", "18091", "--recycler-port", "18083")
    assert (options.router_port, options.router_grpc_port, options.router_admin_port) == (18090, 17090, 18091)
    started: dict[str, list[str]] = {}
    waited: list[tuple[str, int]] = []
    monkeypatch.setattr(companions.Supervisor, "start", lambda self, name, args: started.setdefault(name, args))
    monkeypatch.setattr(companions, "wait_listening", lambda proc, host, port: waited.append((host, port)) or True)

    class Server:
        workdir, config, ep = tmp_path, tmp_path / "config.properties", Endpoints()

    said: list[str] = []
    up._start_companions(Server(), Fleet(tmp_path, {}), options, said.append)  # type: ignore[arg-type]
    route = started["route"]
    assert [route[route.index(flag) + 1] for flag in ("--port", "--grpc-port", "--admin-port")] == \
        ["18090", "17090", "18091"]
    assert started["recycle"][-2:] == ["--metrics-port", "18083"]
    assert waited == [("127.0.0.1", 18090), ("127.0.0.1", 17090)]  # announced only once it listens there
    out = "\n".join(said)
    assert "http://127.0.0.1:18090 and gRPC 127.0.0.1:17090" in out and "admin API http://127.0.0.1:18091" in out
    assert "8090/" not in out.replace("18090", "")  # no default port announced


def test_torchserve_brought_back_mends_the_routes_of_that_router(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Path) -> None:
    class Server:
        workdir = tmp_path
        states = ["died", "died"]  # dead, and still dead a second later: not `tsfleet down`

        def state(self) -> str:
            return self.states.pop(0) if self.states else "stopped"

        def stop(self) -> None:
            pass

    admins: list[str] = []
    monkeypatch.setattr(up, "bring_up", lambda server, fleet, timeout, say, router: admins.append(router.url))
    monkeypatch.setattr(up, "_manifest_now", lambda manifest, fleet, say: fleet)
    supervisor = companions.Supervisor(tmp_path, lambda line: None)
    up.watch(Server(), Fleet(tmp_path, {}), supervisor, 10, lambda line: None, lambda s: None,  # type: ignore[arg-type]
             router_admin="http://127.0.0.1:18091")
    assert admins == ["http://127.0.0.1:18091"]
