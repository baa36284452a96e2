"""The handover's two delicate parts without TorchServe: the message boundary, and the waiter."""
from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from handlers.handover import Gate

ROOT = Path(__file__).resolve().parents[2]


class HandedOver(Exception):
    pass


def _waiting_gate() -> tuple[Gate, socket.socket, socket.socket, threading.Thread, list[object]]:
    """A gate that has served one message and now waits for the next, in a thread."""
    ours, frontend = socket.socketpair()
    gate = Gate(lambda sock: (b"I", sock.recv(1)))
    frontend.sendall(b"1")
    assert gate.next_message(ours) == (b"I", b"1")
    outcome: list[object] = []

    def loop() -> None:
        try:
            outcome.append(gate.next_message(ours))
        except HandedOver:
            outcome.append("handed over")

    worker = threading.Thread(target=loop)
    worker.start()
    deadline = time.monotonic() + 10
    while not gate.idle:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return gate, ours, frontend, worker, outcome


def hand_over(sock: socket.socket) -> None:
    raise HandedOver


def test_an_idle_worker_hands_over_when_woken() -> None:
    gate, ours, _, worker, outcome = _waiting_gate()
    gate.on_handover = hand_over
    gate.wake()
    worker.join(10)
    assert outcome == ["handed over"]


def test_a_due_handover_goes_before_the_message_that_arrives() -> None:
    gate, ours, frontend, worker, outcome = _waiting_gate()
    gate.on_handover = hand_over
    frontend.sendall(b"2")  # wakes the gate, not the pipe: the request is the successor's to read
    worker.join(10)
    assert outcome == ["handed over"]
    ours.setblocking(False)
    assert ours.recv(8) == b"2"


WAITER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    from handlers.handover import become_subreaper, waiter_main
    become_subreaper()                      # as the slot process does before its first successor
    if os.fork() == 0:                      # the first serving process
        first = os.getpid()
        if os.fork() == 0:                  # its successor, which outlives it
            deadline = time.monotonic() + 20
            while os.getppid() == first and time.monotonic() < deadline:
                time.sleep(0.01)            # until the waiter has adopted it
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(0)                         # handed over: exits cleanly
    waiter_main()
""")


def test_the_waiter_adopts_successors_and_exits_with_the_last_ones_status() -> None:
    # 137 after SIGKILL is what TorchServe expects of a killed worker (it answers 507).
    done = subprocess.run([sys.executable, "-c", WAITER, str(ROOT)], timeout=30)
    assert done.returncode == 137
