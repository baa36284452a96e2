"""The router's admin API, as the control plane calls it (weights, baselines, shadows, routes).

Beside ``client.ManagementClient`` (TorchServe's management API): apply, swap, rollout and up
each hold one of these, so none of them opens another's module to learn what ``admin`` is."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests

from tsfleet.control.companions import accepting
from tsfleet.errors import FleetError, NoRouter, Unreachable


@dataclass
class RouterAdmin:
    """The router's admin API at ``url`` with the token from ``key_file``."""

    url: str
    key_file: Path

    def _headers(self) -> dict[str, str]:
        try:
            key = json.loads(Path(self.key_file).read_text())["admin"]
        except (OSError, ValueError, KeyError):
            url = urlsplit(self.url)
            if not accepting(url.hostname or "127.0.0.1", url.port or 80, timeout=5):
                raise NoRouter(f"no router's admin API answers at {self.url}") from None
            raise Unreachable(f"a router answers at {self.url} but its admin key cannot be read from "
                              f"{self.key_file}; run this where the router was started, or give "
                              "--router-key-file") from None
        return {"Authorization": f"Bearer {key}"}

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        headers = self._headers()
        try:
            resp = requests.request(method, self.url + path, json=body, headers=headers, timeout=30)
        except requests.ConnectTimeout:
            raise Unreachable(f"the router's admin API at {self.url} did not accept a connection within 30 s") from None
        except requests.ConnectionError:
            raise NoRouter(f"no router's admin API answers at {self.url}") from None
        except requests.Timeout:
            raise Unreachable(f"the router's admin API at {self.url} did not answer within 30 s") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["message"]
            except (ValueError, KeyError):
                message = resp.text
            raise FleetError(f"router: {message}")
        return resp.json()

    def routes(self) -> dict[str, Any]:
        return self.call("GET", "/routes")
