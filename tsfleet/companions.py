"""Processes that run beside TorchServe (the recycler, later the router), started by `up`.

Each runs as ``python -m tsfleet <command>`` in its own session, logs to
``logs/<name>.log`` and leaves ``logs/<name>.pid`` so ``tsfleet down`` can stop it after a
detached ``up``.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def _pid_file(workdir: Path, name: str) -> Path:
    return workdir / "logs" / f"{name}.pid"


def start(workdir: Path, name: str, args: list[str]) -> subprocess.Popen:
    """Start ``tsfleet <args>`` in the background; its output goes to logs/<name>.log."""
    logs = workdir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tsfleet", *args], cwd=workdir, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    _pid_file(workdir, name).write_text(str(proc.pid))
    return proc


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 60) -> bool:
    """Wait until something accepts on 127.0.0.1:``port``; False if ``proc`` exits first or
    ``timeout`` passes, so a caller never announces an address that refuses connections."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
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
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    return True
