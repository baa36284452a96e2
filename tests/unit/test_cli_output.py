"""What `tsfleet` prints: each line whole and flushed as it is said, and nothing that stops it
from stopping the fleet when its terminal is gone."""
from __future__ import annotations

import io

import pytest

from tsfleet import cli
class Pipe(io.StringIO):
    """Stdout as a pipe to a log collector: counts the flushes."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


class GoneTerminal(io.StringIO):
    """A terminal that hung up: each write fails; what tsfleet tried to write is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.tried: list[str] = []

    def write(self, text: str) -> int:
        self.tried.append(text)
        raise OSError(5, "Input/output error")  # what a write to a hung-up terminal gets


def test_each_line_is_printed_whole_and_flushed_when_said(monkeypatch: pytest.MonkeyPatch) -> None:
    # Flushed per line: `tsfleet up` runs for days with its stdout in a pipe, and a line that
    # waits in a buffer says nothing to whoever tails it.
    pipe = Pipe()
    monkeypatch.setattr("sys.stdout", pipe)
    cli._say("stopping the router, the recycler and TorchServe")
    assert (pipe.getvalue(), pipe.flushes) == ("stopping the router, the recycler and TorchServe\n", 1)
    cli._say("stopped")
    assert (pipe.getvalue(), pipe.flushes) == ("stopping the router, the recycler and TorchServe\nstopped\n", 2)


def test_saying_something_to_a_terminal_that_went_away_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    gone = GoneTerminal()
    monkeypatch.setattr("sys.stdout", gone)
    # Neither line raises, and the second is still tried: a hung-up terminal ends no command
    # halfway and silences nothing for good (the logs still say it all).
    assert cli._say("stopping the router, the recycler and TorchServe") is None
    assert cli._say("stopped") is None
    assert gone.tried == ["stopping the router, the recycler and TorchServe", "stopped"]
