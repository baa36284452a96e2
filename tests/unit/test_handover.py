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


def test_the_gate_hands_over_between_messages_without_reading_the_next() -> None:
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
    while not gate.idle:  # waiting for the next message
        assert time.monotonic() < deadline
        time.sleep(0.01)

    def hand_over(sock: socket.socket) -> None:
        raise HandedOver

    gate.on_handover = hand_over
    frontend.sendall(b"2")  # arrives while the handover is due: it is the successor's to read
    gate.wake()
    worker.join(10)
    assert outcome == ["handed over"]
    ours.setblocking(False)
    assert ours.recv(8) == b"2"


WAITER = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, sys.argv[1])
    from handlers.handover import waiter_main
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
