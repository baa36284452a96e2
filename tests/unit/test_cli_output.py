"""What `tsfleet` prints must not stop it from stopping the fleet when its terminal is gone."""
from __future__ import annotations

import io

import pytest

from tsfleet import cli


class GoneTerminal(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError(5, "Input/output error")  # what a write to a hung-up terminal gets


def test_saying_something_to_a_terminal_that_went_away_is_not_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdout", GoneTerminal())
    cli._say("stopping the router, the recycler and TorchServe")  # must not raise
