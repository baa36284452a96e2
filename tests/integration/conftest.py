"""The integration tier's setup.

Its real TorchServe (one per test session, on free loopback ports, token auth on, serving
the fleet built from fleet.yaml; stopped at the end) and the fixtures around it live in
tests/fleet_fixtures.py, loaded by tests/conftest.py, because tests/reliability uses the
same server: defined here they would be a second definition, and a session that runs both
folders would start two servers. The names stay importable from here for the modules that
import them.
"""
from __future__ import annotations

from typing import Any

from tests import fleet_fixtures
from tests.fleet_fixtures import ROOT, Client, free_ports, new_server

__all__ = ["ROOT", "Client", "free_ports", "new_server"]


def __getattr__(name: str) -> Any:
    # The fixtures (``from tests.integration.conftest import model_store``) are handed out
    # on demand, not bound in this module: pytest registers every fixture a conftest holds as
    # its own definition, which would give this folder a second TorchServe.
    if name in {"fleet", "model_store", "server", "client", "headers", "fleet_router"}:
        return getattr(fleet_fixtures, name)
    raise AttributeError(name)
