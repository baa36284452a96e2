"""`tsfleet up`'s supervisor: a companion that exits is started again, sooner or later."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.polling import wait_for
from tsfleet.control import companions
def test_a_companion_that_keeps_exiting_is_started_again_later_each_time(tmp_path: Path) -> None:
    said: list[str] = []
    supervisor = companions.Supervisor(tmp_path, said.append)
    first = supervisor.start("helper", ["--help"])  # prints its usage and exits at once

    def restarted(times: int) -> bool:
        supervisor.check()
        return sum("starting it again" in line for line in said) >= times and supervisor.watched["helper"].due is None

    wait_for("two restarts", lambda: restarted(2), timeout=30)
    assert supervisor.watched["helper"].proc is not first
    assert said[0] == "the helper companion exited (code 0); starting it again in 1 s (log: logs/helper.log)"
    assert "starting it again in 2 s" in said[1]
    assert "usage: tsfleet" in (tmp_path / "logs" / "helper.log").read_text()


def test_a_companion_stopped_on_purpose_stays_stopped(tmp_path: Path) -> None:
    said: list[str] = []
    supervisor = companions.Supervisor(tmp_path, said.append)
    proc = supervisor.start("helper", ["--help"])
    companions.stop(tmp_path, "helper")  # what `tsfleet down` does: the pid file goes first
    proc.wait(timeout=30)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # a restart would be due within 1 s
        supervisor.check()
        time.sleep(0.05)
    assert said == [] and supervisor.watched["helper"].proc is proc


def test_stopping_a_companion_of_our_own_does_not_wait_out_the_timeout(tmp_path: Path) -> None:
    # Under a foreground `up` the companions are its children: one that exited on SIGTERM is
    # a zombie until reaped, and Ctrl-C took 2 x 15 s waiting for the router and the recycler.
    child = subprocess.Popen(["sleep", "60"])
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "helper.pid").write_text(str(child.pid))
    started = time.monotonic()
    assert companions.stop(tmp_path, "helper", timeout=15)
    assert time.monotonic() - started < 5
    assert not (tmp_path / "logs" / "helper.pid").exists()
