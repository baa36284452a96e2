"""`tsfleet up`'s watch over TorchServe, against a stand-in for it: one that died is started
again, and one that keeps dying is given up on with a reason. The real TorchServe killed and
brought back is in tests/integration/test_cli_up.py."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.polling import wait_for
from tsfleet.control import companions
from tsfleet.errors import FleetError, ServerError
from tsfleet.manifest import Fleet
from tsfleet.control.up import MAX_QUICK_RESTARTS, UpOptions, run, watch


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """up.run sets its own for Ctrl-C and SIGTERM; pytest keeps its own."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class NoModels:
    """A management client of a server with nothing registered: apply has nothing to do."""

    def state(self) -> dict:
        return {}

    def list_workflows(self) -> list[str]:
        return []


class StandIn:
    """Says the states it is given in turn; a start fails while ``failing``."""

    def __init__(self, workdir: Path, states: list[str], failing: bool = False):
        self.workdir, self.states, self.failing = workdir, states, failing
        self.model_store = self.report_dir = workdir
        self.starts = self.stops = 0

    def state(self) -> str:
        return self.states.pop(0) if self.states else "stopped"

    def start(self) -> None:
        self.starts += 1
        if self.failing:
            raise ServerError("torchserve --start failed: port 8080 is taken")

    def stop(self) -> None:
        self.stops += 1

    def wait_for_keys(self, deadline: float) -> None:
        pass

    @property
    def client(self) -> "NoModels":
        return NoModels()

    def wait_ready(self, fleet: Fleet, timeout: float, progress: object) -> None:
        pass

    def warm_up(self, fleet: Fleet) -> int:
        return 0


def test_torchserve_that_died_is_started_again(tmp_path: Path) -> None:
    said: list[str] = []
    slept: list[float] = []
    server = StandIn(tmp_path, ["running", "died", "died", "running", "running", "stopped"])
    watch(server, Fleet(tmp_path, {}), companions.Supervisor(tmp_path, said.append), 10, said.append, slept.append)
    assert server.starts == 1
    assert any("TorchServe exited unexpectedly" in line and "starting it again" in line for line in said)
    assert said[-1] == "TorchServe is back; the router serves again"


def test_torchserve_that_keeps_dying_is_given_up_on(tmp_path: Path) -> None:
    said: list[str] = []
    slept: list[float] = []
    server = StandIn(tmp_path, ["died", "died"], failing=True)
    with pytest.raises(FleetError, match="keeps exiting soon after its start"):
        watch(server, Fleet(tmp_path, {}), companions.Supervisor(tmp_path, said.append), 10, said.append,
              slept.append)
    assert server.starts == MAX_QUICK_RESTARTS
    assert slept == [1, 1, 2, 4, 8]  # a look to tell a death from `tsfleet down`, then growing delays
    assert sum("did not come back: torchserve --start failed: port 8080 is taken" in line for line in said) == 4


def test_torchserve_stopped_by_tsfleet_down_is_left_stopped(tmp_path: Path) -> None:
    # Its process has ended, its pid file is still there for a moment: it looks dead.
    said: list[str] = []
    supervisor = companions.Supervisor(tmp_path, said.append)
    server = StandIn(tmp_path, ["running", "died", "stopped"])
    watch(server, Fleet(tmp_path, {}), supervisor, 10, said.append, lambda s: None)
    assert server.starts == 0 and said == []
    # The same when the look still finds it dead, but `down` has stopped the companions.
    proc = supervisor.start("helper", ["--help"])
    companions.stop(tmp_path, "helper")
    proc.wait(timeout=30)
    server = StandIn(tmp_path, ["died", "died"])
    watch(server, Fleet(tmp_path, {}), supervisor, 10, said.append, lambda s: None)
    assert server.starts == 0 and said == []


def test_up_leaves_a_fleet_that_already_runs_alone(tmp_path: Path) -> None:
    # It used to try, fail on "already running", and stop the running fleet on its way out.
    said: list[str] = []
    server = StandIn(tmp_path, ["running"])
    with pytest.raises(FleetError, match="already running .* this up changed nothing"):
        run(server, Fleet(tmp_path, {}), UpOptions(manifest=str(tmp_path / "fleet.yaml")), said.append)
    assert (server.starts, server.stops) == (0, 0)


def test_up_leaves_a_router_started_here_alone(tmp_path: Path) -> None:
    said: list[str] = []
    # Stands in for `python -m tsfleet route ...` as up starts it: a process named tsfleet.
    router = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "tsfleet", "route"])
    # /proc shows a new process's command line a moment after its start.
    wait_for("the stand-in's command line", lambda: b"tsfleet" in Path(f"/proc/{router.pid}/cmdline").read_bytes())
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "route.pid").write_text(str(router.pid))
    server = StandIn(tmp_path, ["stopped"], failing=True)
    try:
        with pytest.raises(FleetError, match=f"the route companion of a fleet started here still runs \\(pid {router.pid}\\)"):
            run(server, Fleet(tmp_path, {}), UpOptions(manifest=str(tmp_path / "fleet.yaml")), said.append)
        assert (server.starts, server.stops) == (0, 0) and router.poll() is None
    finally:
        router.kill()
        router.wait(timeout=30)
    # A pid file left by a router that is gone is no reason to refuse.
    with pytest.raises(FleetError, match="port 8080 is taken"):
        run(server, Fleet(tmp_path, {}), UpOptions(manifest=str(tmp_path / "fleet.yaml")), said.append)
    assert server.starts == 1
