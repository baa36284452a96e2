"""Replace a worker's process in place: a fresh process takes over its connection to TorchServe.

TorchServe cannot retire a chosen worker. A worker process that exits fails the batch the
frontend has already taken for it, and under load the frontend takes the next batch as soon
as an answer arrives, so there is no safe moment to exit. Scaling down is no better: it
removes the newest worker, busy or not. So a recycled worker never leaves the frontend's view:

1. The serving process starts a *successor* (``python -c`` on :func:`successor_main`) that
   inherits the connection's socket and loads the model from the same archive, while the old
   process goes on serving. Capacity does not drop.
2. Once the successor says it is ready, the old process hands over at a message boundary: its
   last answer sent, no byte of the next request read. The successor serves from then on.
3. The process TorchServe started (the *slot* pid, the one ``describe`` shows) stays, turned
   into a small waiter that reaps its descendants and exits with the serving process's status,
   so TorchServe still sees a worker die when the serving process dies, and restarts the slot.
   A serving process that is not the slot process simply exits; the waiter adopts its successor.

It leans on TorchServe 0.12's worker (ts/model_service_worker.py, pinned in requirements.txt):
its loop reads each message through a module-level ``retrieve_msg``, and its ``load_model``
frame holds the load request. Should a later version differ, :func:`install` finds nothing,
and a replacement fails with that reason while the old process keeps serving.

This module imports the standard library only: the waiter runs it without torch.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable

from handlers.contract import pid_alive

log = logging.getLogger(__name__)
SLOT_ENV = "TSFLEET_SLOT_PID"
SUCCESSOR_ENV = "TSFLEET_SUCCESSOR"
PR_SET_CHILD_SUBREAPER = 36


def slot_pid() -> int:
    """The pid TorchServe knows this worker by (this process, unless it is a successor)."""
    return int(os.environ.get(SLOT_ENV, os.getpid()))


def is_successor() -> bool:
    return os.environ.get(SUCCESSOR_ENV) == "1"


def _frames() -> list[FrameType]:
    frame, out = sys._getframe(), []
    while frame is not None:
        out.append(frame)
        frame = frame.f_back
    return out


def _text(value: Any) -> str | None:
    return value.decode() if isinstance(value, (bytes, bytearray)) else value


class Gate:
    """Where the worker reads its next message: the one point where a handover is safe.

    It replaces ``retrieve_msg`` in TorchServe's worker loop (a successor's own loop calls
    it directly). Waiting for the next message, it also watches a wake-up pipe, so a ready
    successor takes over even while no request arrives."""

    def __init__(self, read: Callable[[socket.socket], tuple[bytes, Any]]):
        self.read = read
        self.sock: socket.socket | None = None
        self.idle = False
        self.on_handover: Callable[[socket.socket], None] | None = None
        self._wake_r, self._wake_w = os.pipe()

    def wake(self) -> None:
        os.write(self._wake_w, b"!")

    def next_message(self, sock: socket.socket) -> tuple[bytes, Any]:
        self.sock = sock
        while True:
            if self.on_handover is not None:
                self.on_handover(sock)  # does not return
            self.idle = True
            try:
                ready, _, _ = select.select([sock, self._wake_r], [], [])
            finally:
                self.idle = False
            if self._wake_r in ready:
                os.read(self._wake_r, 64)
            if self._wake_r in ready or self.on_handover is not None:
                continue  # a due handover goes first: what has arrived is the successor's
            return self.read(sock)


GATE: Gate | None = None
LOAD: dict[str, Any] | None = None  # what TorchServe asked this worker to load
LOAD_KEYS = ("modelName", "modelPath", "handler", "envelope", "batchSize", "gpu", "limitMaxImagePixels",
             "metricsConfig")


def install() -> Gate | None:
    """In a TorchServe worker (called from the handler's ``initialize``): put the gate into
    the worker loop and keep the load request a successor needs. None elsewhere (tests)."""
    global GATE, LOAD
    if GATE is not None or is_successor():
        return GATE
    loop = load = None
    for frame in _frames():
        if frame.f_code.co_name == "handle_connection" and "retrieve_msg" in frame.f_globals:
            loop = frame
        if frame.f_code.co_name == "load_model" and isinstance(frame.f_locals.get("load_model_request"), dict):
            load = frame.f_locals["load_model_request"]
    if loop is None or load is None:
        return None
    LOAD = {key: _text(load.get(key)) for key in LOAD_KEYS}
    LOAD["limitMaxImagePixels"] = load.get("limitMaxImagePixels", True)
    LOAD["metricsConfig"] = _arg("--metrics-config")
    GATE = Gate(loop.f_globals["retrieve_msg"])
    loop.f_globals["retrieve_msg"] = GATE.next_message
    return GATE


def _arg(name: str) -> str | None:
    argv = sys.argv
    return argv[argv.index(name) + 1] if name in argv and argv.index(name) + 1 < len(argv) else None


class Successor:
    """A fresh process loading the same model, holding a copy of the connection."""

    def __init__(self, gate: Gate, load: dict[str, Any]):
        if gate.sock is None:
            raise RuntimeError("the worker has not begun serving yet")
        if os.getpid() == slot_pid():
            become_subreaper()
        ready_r, ready_w = os.pipe()
        go_r, self._go_w = os.pipe()
        fd = gate.sock.fileno()
        spec = {**load, "fd": fd, "ready": ready_w, "go": go_r, "slot": slot_pid()}
        env = {**os.environ, SLOT_ENV: str(slot_pid()), SUCCESSOR_ENV: "1"}
        boot = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from handlers.handover import successor_main; successor_main(sys.argv[2])")
        self.proc = subprocess.Popen([sys.executable, "-c", boot, load["modelPath"], json.dumps(spec)],
                                     pass_fds=(fd, ready_w, go_r), env=env)
        os.close(ready_w)
        os.close(go_r)
        self._ready_r = ready_r

    def wait_ready(self, give_up: Callable[[], bool]) -> str | None:
        """None once the successor has loaded the model, else why it will not."""
        try:
            while True:
                ready, _, _ = select.select([self._ready_r], [], [], 0.2)
                if ready:
                    if os.read(self._ready_r, 1) == b"R":
                        return None
                    code = self.proc.wait()
                    return f"the successor process failed to load the model (exit code {code})"
                if give_up():
                    self.abandon()
                    return "the recycler withdrew its request"
        finally:
            os.close(self._ready_r)

    def abandon(self) -> None:
        os.close(self._go_w)  # the successor reads EOF and exits
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def hand_over(self, sock: socket.socket) -> None:
        """At a message boundary, in the worker's main thread: the successor serves from now."""
        os.write(self._go_w, b"G")
        log.info("worker %d handed its connection to process %d", os.getpid(), self.proc.pid)
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        if os.getpid() == slot_pid():
            # TorchServe watches this pid: stay, as the waiter (its memory is released by exec).
            boot = "import sys; sys.path.insert(0, sys.argv[1]); from handlers.handover import waiter_main; waiter_main()"
            os.execv(sys.executable, [sys.executable, "-c", boot, os.path.dirname(os.path.dirname(__file__))])
        os._exit(0)


def successor_main(spec_json: str) -> None:
    """Entry point of a successor process: load, say ready, wait for the word, then serve."""
    logging.basicConfig(stream=sys.stdout, format="%(message)s", level=logging.INFO)
    spec = json.loads(spec_json)
    serving = _exit_with_slot(int(spec["slot"]))
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.model_loader import ModelLoaderFactory
    from ts.protocol.otf_message_handler import retrieve_msg

    cache = MetricsCacheYamlImpl(config_file_path=spec["metricsConfig"])
    cache.initialize_cache()
    cache.model_name = spec["modelName"]
    service = ModelLoaderFactory.get_model_loader().load(
        spec["modelName"], spec["modelPath"], spec["handler"], spec["gpu"], spec["batchSize"],
        spec["envelope"] or None, bool(spec["limitMaxImagePixels"]), cache)
    os.write(spec["ready"], b"R")
    os.close(spec["ready"])
    if os.read(spec["go"], 1) != b"G":
        os._exit(0)  # the old process gave up on us
    os.close(spec["go"])
    serving.set()
    sock = socket.socket(fileno=spec["fd"])
    sock.setblocking(True)
    service.set_cl_socket(sock)
    global GATE, LOAD
    GATE = Gate(retrieve_msg)
    LOAD = {key: spec[key] for key in LOAD_KEYS}  # for this process's own successor, later
    for hook in TAKE_OVER:
        hook()
    log.info("process %d took over worker %d of %s", os.getpid(), spec["slot"], spec["modelName"])
    while True:
        cmd, msg = GATE.next_message(sock)
        if cmd != b"I":
            raise ValueError(f"worker {spec['slot']}: unexpected command {cmd!r} after a handover")
        sock.sendall(service.predict(msg))


TAKE_OVER: list[Callable[[], None]] = []  # run once a successor serves (the lifecycle's reports)


def _exit_with_slot(slot: int) -> threading.Event:
    """A successor must not outlive the slot process TorchServe watches (scale-down, stop),
    nor, until it serves, the process that started it: it holds a copy of the connection,
    which would hide that process's death from TorchServe. Set the event once it serves."""
    serving, parent = threading.Event(), os.getppid()

    def watch() -> None:
        try:
            fds = {os.pidfd_open(slot): True, os.pidfd_open(parent): False}
            while True:
                ready, _, _ = select.select(list(fds), [], [])
                # The old process exits right after its word, maybe before we read it: a
                # moment for the main thread to read the word (or the pipe's end).
                if any(fds[fd] for fd in ready) or not serving.wait(5):
                    break
                for fd in ready:  # the old process handed over and exited, as it should
                    del fds[fd]
        except OSError:
            while pid_alive(slot) and (serving.is_set() or pid_alive(parent)):
                time.sleep(0.5)
        os._exit(1)
    threading.Thread(target=watch, name="slot-watch", daemon=True).start()
    return serving


def _children() -> list[int]:
    pids: list[int] = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{task}/children") as fh:
                pids += [int(p) for p in fh.read().split()]
        except OSError:
            continue
    return pids


def become_subreaper() -> None:
    """Adopt orphaned descendants (a successor whose parent handed over and exited). Kept
    across exec, so the slot process sets it before its first successor exists."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def waiter_main() -> None:
    """What the slot process becomes after its first handover: it adopts every later serving
    process (child subreaper), passes on the signals TorchServe sends, and exits as the
    serving process exits, with its status (137 after SIGKILL, as TorchServe expects)."""
    become_subreaper()

    def forward(signum: int, _frame: Any) -> None:
        for pid in _children():
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    code = 0
    while True:
        try:
            _, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(code)
        except InterruptedError:
            continue
        code = os.waitstatus_to_exitcode(status)
        code = 128 - code if code < 0 else code
