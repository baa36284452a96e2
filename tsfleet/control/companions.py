"""Processes that run beside TorchServe (the recycler, the router), started by `up`.

Each runs as ``python -m tsfleet <command>`` in its own session, logs to
``logs/<name>.log`` (rolled and pruned: rolling_log.py) and leaves ``logs/<name>.pid`` so
``tsfleet down`` can stop it after a detached ``up``. While `up` runs in the foreground, a
``Supervisor`` starts again one that exits (a crash, an out-of-memory kill), as systemd's
``Restart=always`` would.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from handlers.contract import pid_alive
from tsfleet.control import rolling_log
from tsfleet.errors import StorageError
from tsfleet.files import write_atomically


def _pid_file(workdir: Path, name: str) -> Path:
    return workdir / "logs" / f"{name}.pid"


# The log writers started so far, reaped once they have ended (each ends after its companion).
_writers: list[subprocess.Popen] = []


def start(workdir: Path, name: str, args: list[str]) -> subprocess.Popen:
    """Start ``tsfleet <args>`` in the background; its output (stdout and stderr, its child
    processes' too) goes to logs/<name>.log, which rolls (rolling_log.py)."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    _writers[:] = [w for w in _writers if w.poll() is None]
    writer = rolling_log.start(logs / f"{name}.log")
    _writers.append(writer)
    try:
        proc = subprocess.Popen([sys.executable, "-m", "tsfleet", *args], cwd=workdir, stdout=writer.stdin,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        writer.stdin.close()  # only the companion holds the pipe now: the writer ends when it does
    try:
        write_atomically(_pid_file(workdir, name), str(proc.pid))
    except StorageError:
        proc.kill()  # not stoppable by `tsfleet down` without its pid file: not left running
        proc.wait()
        raise
    return proc


def running(workdir: Path, name: str) -> int | None:
    """The pid of the companion ``name`` started from ``workdir``, if it still runs."""
    try:
        pid = int(_pid_file(workdir, name).read_text())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None  # no pid file, or no such process
    return pid if b"tsfleet" in cmdline else None  # a stale file whose pid was reused


def reachable(host: str) -> str:
    """An address to reach a listener bound to ``host`` from this machine (a wildcard: loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)


def accepting(host: str, port: int, timeout: float = 1) -> bool:
    """Whether something accepts a connection on ``host``:``port`` now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_listening(proc: subprocess.Popen, host: str, port: int, timeout: float = 60) -> bool:
    """Wait until something accepts on ``host``:``port``; False if ``proc`` exits first or
    ``timeout`` passes, so a caller never announces an address that refuses connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if accepting(host, port):
            return True
        time.sleep(0.1)
    return False


def stop(workdir: Path, name: str, timeout: float = 15) -> bool:
    """SIGTERM the companion named ``name`` (then SIGKILL); True if one was running."""
    path = _pid_file(workdir, name)
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return False
    path.unlink(missing_ok=True)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited. One of our own children (under a foreground `up`) stays a
    zombie, which still answers ``kill 0``, until it is reaped: so it is reaped here."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:  # not our child: whoever started it reaps it
        return not pid_alive(pid)


STEADY_S = 60.0  # a companion that ran this long before it exited is started again at once
MAX_DELAY_S = 30.0


@dataclass
class Backoff:
    """When to start again something that exited: at once after a steady run, 1, 2, 4 ...
    MAX_DELAY_S s later while it keeps exiting soon after its start."""

    started: float = field(default_factory=time.monotonic)
    quick_exits: int = 0  # in a row, each sooner than STEADY_S after its start

    def exited(self, quick: bool = False) -> float:
        """It exited (``quick``: count it as soon after its start, whenever it was): the delay."""
        quick = quick or time.monotonic() - self.started < STEADY_S
        self.quick_exits = self.quick_exits + 1 if quick else 0
        return min(MAX_DELAY_S, 2.0 ** (self.quick_exits - 1)) if self.quick_exits else 0.0

    def restarted(self) -> None:
        self.started = time.monotonic()


@dataclass
class _Watched:
    args: list[str]
    proc: subprocess.Popen
    backoff: Backoff = field(default_factory=Backoff)
    due: float | None = None  # when an exited one starts again


class Supervisor:
    """Starts companions, and (``check``, called regularly) starts again any that exited,
    with a growing delay when it keeps exiting soon after its start."""

    def __init__(self, workdir: Path, say: Callable[[str], None]):
        self.workdir, self.say = workdir, say
        self.watched: dict[str, _Watched] = {}

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        proc = start(self.workdir, name, args)
        self.watched[name] = _Watched(args, proc)
        return proc

    def stopped_on_purpose(self) -> bool:
        """Whether one of the companions was stopped by `tsfleet down` (or ``stop``)."""
        return any(not _pid_file(self.workdir, name).exists() for name in self.watched)

    def check(self) -> None:
        now = time.monotonic()
        for name, w in self.watched.items():
            if w.due is None and w.proc.poll() is not None:
                if not _pid_file(self.workdir, name).exists():
                    continue  # stopped on purpose (`tsfleet down` removes the pid file first)
                delay = w.backoff.exited()
                self.say(f"the {name} companion exited (code {w.proc.returncode}); starting it again"
                         + (f" in {delay:.0f} s" if delay else "") + f" (log: logs/{name}.log)")
                w.due = now + delay
            if w.due is not None and now >= w.due and _pid_file(self.workdir, name).exists():
                w.proc, w.due = start(self.workdir, name, w.args), None
                w.backoff.restarted()
