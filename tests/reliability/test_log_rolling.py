"""The companions' logs (logs/route.log, logs/recycle.log) roll and are pruned, so they never
fill a disk, and keep everything the companion's processes write: the router's front
processes' lines, and a traceback at start-up.

The router runs as `tsfleet up` starts it (companions.start), with a tiny roll size so that a
few hundred log lines roll it several times. Each line comes from a refused connection: an
HTTP/2 frame over the size limit, which the router logs and closes.
"""
from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from tests.polling import wait_for
from tsfleet.control import companions
from tsfleet.control import rolling_log
from tsfleet.errors import FleetError
from tsfleet.manifest import load_fleet
from tsfleet.build.properties import Endpoints, render_properties
from tsfleet.build.recipes import ROOT

pytestmark = pytest.mark.reliability

ROLL_BYTES = 4096
KEEP = 2
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TOO_LARGE = 0xFFFFFF  # the largest length a frame header can name, far over the router's frame size
FRAME_LINE = re.compile(r"closing an HTTP/2 connection: frame of (\d+) bytes")


def text(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        return ""


def route_args(workdir: Path, port: int | None = None) -> tuple[list[str], int]:
    """`up`'s arguments for the router (up._start_companions), on free ports; TorchServe's
    ports in its config.properties have nothing behind them: refusals need no TorchServe."""
    fleet = load_fleet(ROOT / "fleet.yaml")
    config = workdir / "config.properties"
    config.write_text(render_properties(fleet, Endpoints.on_free_ports(), str(workdir / "model_store")))
    free = Endpoints.on_free_ports()
    common = ["--manifest", str(ROOT / "fleet.yaml"), "--config", str(config),
              "--key-file", str(workdir / "key_file.json")]
    return [*common, "route", "--processes", "2", "--host", "127.0.0.1", "--port", str(port or free.inference),
            "--admin-port", str(free.management), "--grpc-port", str(free.metrics)], free.metrics


@pytest.fixture
def small_rolls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(rolling_log.ROLL_BYTES_ENV, str(ROLL_BYTES))
    monkeypatch.setenv(rolling_log.KEEP_ENV, str(KEEP))


@pytest.fixture
def router(tmp_path: Path, small_rolls: None) -> Iterator[tuple[Path, int]]:
    """A router of two processes (a leader and a front sharing its ports), as `up` starts it:
    its work folder and gRPC port."""
    args, grpc_port = route_args(tmp_path)
    proc = companions.start(tmp_path, "route", args)
    try:
        # The banner comes once both processes listen.
        wait_for("the router's banner in route.log", lambda: proc.poll() is not None
                 or "router: REST" in text(tmp_path / "logs" / "route.log"))
        assert proc.poll() is None, text(tmp_path / "logs" / "route.log")[-3000:]
        yield tmp_path, grpc_port
    finally:
        companions.stop(tmp_path, "route")


def refuse(port: int, length: int) -> None:
    """One connection whose first frame names ``length`` bytes: the router logs a line naming
    it, then closes; returns once it has."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(PREFACE + length.to_bytes(3, "big") + b"\x00\x00\x00\x00\x00\x01")
        while conn.recv(4096):  # the GOAWAY, then the close
            pass


def test_route_log_rolls_keeps_the_newest_lines_and_prunes_the_rest(router: tuple[Path, int]) -> None:
    workdir, grpc_port = router
    logs = workdir / "logs"
    sent = [TOO_LARGE - i for i in range(300)]  # about 27 KB of log: 6 times the roll size
    for length in sent:
        refuse(grpc_port, length)
    wait_for("the last refusal's line in route.log", lambda: f"frame of {sent[-1]} bytes" in text(logs / "route.log"))

    files = sorted(p.name for p in logs.iterdir() if p.name.startswith("route.log"))
    assert files == ["route.log", "route.log.1", "route.log.2"]  # the newest KEEP archives, no more
    sizes = {name: (logs / name).stat().st_size for name in files}
    assert all(0 < size <= ROLL_BYTES for size in sizes.values()), sizes

    # Oldest to newest, the files hold an unbroken run of the newest lines, ending with the
    # last refusal: nothing lost or doubled where the file rolled; the oldest lines are gone.
    lines = [line for name in reversed(files) for line in (logs / name).read_text().splitlines()]
    kept = [int(m[1]) for line in lines if (m := FRAME_LINE.search(line))]
    assert kept == sent[-len(kept):], kept[:5]
    assert sent[0] not in kept and len(kept) < len(sent)
    # The front process's lines reach the same file, in order with the leader's (the kernel
    # spreads connections over both): one writer rolls it for all.
    refusals = [line for line in lines if FRAME_LINE.search(line)]
    assert any(" front " in line for line in refusals) and any(" front " not in line for line in refusals)

    companions.stop(workdir, "route")
    wait_for("the router's last words in route.log", lambda: "router stopped" in text(logs / "route.log"))
    assert text(logs / "route.log").splitlines()[-1] == "router stopped"


def test_a_traceback_at_start_up_lands_in_the_log(tmp_path: Path, small_rolls: None) -> None:
    # Its REST port taken: the router fails while it starts, before it serves anything.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args, _ = route_args(tmp_path, port=taken.getsockname()[1])
        proc = companions.start(tmp_path, "route", args)
        try:
            assert proc.wait(60) != 0
        except subprocess.TimeoutExpired:
            companions.stop(tmp_path, "route")
            raise
    log = tmp_path / "logs" / "route.log"
    wait_for("the traceback in route.log", lambda: "address already in use" in text(log))
    assert "Traceback (most recent call last)" in text(log)


def test_a_roll_setting_that_is_no_size_stops_the_start_naming_it(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A typo must not leave the router logging nowhere, or a log without a bound.
    monkeypatch.setenv(rolling_log.ROLL_BYTES_ENV, "10MB")
    with pytest.raises(FleetError, match="^TSFLEET_LOGS_ROLL_BYTES='10MB': expected a whole number of at least 1024$"):
        companions.start(tmp_path, "route", ["--help"])
    assert not (tmp_path / "logs" / "route.pid").exists()


def test_whoever_reads_ups_output_is_not_held_by_the_log_writers(tmp_path: Path) -> None:
    # `out=$(tsfleet up --detach)` and a CI step reading `up`'s output wait for every holder
    # of its stdout to let go: the companions and their log writers must not hold it.
    args, _ = route_args(tmp_path)
    script = ("import sys; from pathlib import Path; from tsfleet.control import companions; "
              "companions.start(Path(sys.argv[1]), 'route', sys.argv[2:]); print('started')")
    try:
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path), *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout == "started\n", done
        pid = int((tmp_path / "logs" / "route.pid").read_text())
        assert Path(f"/proc/{pid}").exists()  # the router runs on, its output in route.log
        wait_for("the router's banner in route.log", lambda: "router: REST" in text(tmp_path / "logs" / "route.log"))
    finally:
        companions.stop(tmp_path, "route")
