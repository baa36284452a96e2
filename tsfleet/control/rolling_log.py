"""The writer of a companion's log (logs/route.log, logs/recycle.log): it rolls and prunes it.

``python -m tsfleet.control.rolling_log PATH ROLL_BYTES KEEP`` copies what it reads on stdin, a line
at a time, into PATH through a RotatingFileHandler: past ROLL_BYTES, PATH becomes PATH.1
(PATH.1 becomes PATH.2 ...) and only KEEP such archives are kept, so a companion's log never
takes more than (KEEP + 1) x ROLL_BYTES of disk.

`up` starts one per companion and points the companion's stdout and stderr at its stdin
(companions.start). A pipe to one writer, rather than a handler inside the companion, because:

- everything the companion's processes write reaches the log: its `print`s, its logging, a
  traceback at start-up (before any logging is set up) or from the interpreter, and the
  output of the router's front processes, which inherit the pipe;
- a router of several processes has one writer, so the file rolls once: each process rolling
  it on its own would rename the file under the others (Python's handlers do not coordinate
  across processes), losing lines or keeping files past the bound.

The writer ends when every process holding the pipe has exited, after the last line: it
ignores Ctrl-C, SIGTERM and a hang-up, which reach it with the companion's and would
otherwise cut off the companion's last words (a traceback, "router stopped"). A line it
cannot write (a full disk) is dropped, and it goes on reading: a companion is never held up
by its log.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

from tsfleet.errors import FleetError

# Smaller files than TorchServe's 100 MB (log4j2.xml): these archives are not compressed.
ROLL_BYTES = 10 * 2**20
KEEP = 5  # archives: PATH.1 (the newest) ... PATH.5, so at most 60 MB per companion
# Environment variables that change them for `up` (read where the writer is started).
ROLL_BYTES_ENV = "TSFLEET_LOGS_ROLL_BYTES"
KEEP_ENV = "TSFLEET_LOGS_KEEP"
MAX_LINE = 64 * 1024  # a longer line is written in pieces: no line can hold the writer's memory


def settings(env: dict[str, str] | None = None) -> tuple[int, int]:
    """(bytes per file, archives kept), from the environment or the defaults."""
    env = os.environ if env is None else env
    values = []
    for name, default, least in ((ROLL_BYTES_ENV, ROLL_BYTES, 1024), (KEEP_ENV, KEEP, 1)):
        text = env.get(name, "").strip()
        try:
            value = int(text) if text else default
        except ValueError:
            value = least - 1
        if value < least:
            raise FleetError(f"{name}={text!r}: expected a whole number of at least {least}")
        values.append(value)
    return values[0], values[1]


def start(path: Path) -> subprocess.Popen:
    """Start a writer for ``path``; a companion's stdout and stderr go to its ``stdin``."""
    roll_bytes, keep = settings()
    path = Path(path).resolve()
    # Not `up`'s stdout or stderr: a writer holding them would keep whoever reads `up`'s
    # output (`$(tsfleet up --detach)`, a CI step) waiting for as long as the companion runs.
    # Should the writer itself fail to start, its traceback is at the end of the log.
    with open(path, "ab") as own_errors:
        return subprocess.Popen(
            [sys.executable, "-m", "tsfleet.control.rolling_log", str(path), str(roll_bytes), str(keep)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=own_errors,
            # Its own session: Ctrl-C on `up` reaches the companion, which says its last words
            # here; the writer stays until it has written them.
            start_new_session=True,
        )


def copy_lines(source: BinaryIO, handler: logging.Handler, max_line: int = MAX_LINE) -> None:
    """Write every line of ``source`` through ``handler`` until it ends; a line longer than
    ``max_line`` bytes goes in pieces."""
    while chunk := source.readline(max_line):
        line = chunk.decode("utf-8", errors="replace").rstrip("\r\n")
        handler.handle(logging.makeLogRecord({"msg": line, "levelno": logging.INFO, "levelname": "INFO"}))


def main(argv: list[str]) -> None:
    path, roll_bytes, keep = Path(argv[0]), int(argv[1]), int(argv[2])
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # A write that fails (a full disk) drops its line without a word: the writer has nowhere
    # to say it, and must go on draining the pipe.
    logging.raiseExceptions = False
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=roll_bytes, backupCount=keep,
                                                   encoding="utf-8", delay=True)
    handler.setFormatter(logging.Formatter("%(message)s"))
    try:
        # A piece no longer than a file, so that no file holds much more than roll_bytes.
        copy_lines(sys.stdin.buffer, handler, min(MAX_LINE, roll_bytes))
    finally:
        handler.close()


if __name__ == "__main__":
    main(sys.argv[1:])
