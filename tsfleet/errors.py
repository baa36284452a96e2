"""Errors of the toolkit's own commands (manifest, build, server start). The CLI prints the
message and exits non-zero; no traceback for a user's mistake."""
from __future__ import annotations


class FleetError(Exception):
    """A problem the user can fix; the message says what and where."""


class ManifestError(FleetError):
    """The fleet manifest is invalid."""


class BuildError(FleetError):
    """An archive could not be built."""


class ServerError(FleetError):
    """TorchServe could not be started, reached or brought to ready."""
