"""A typed client for TorchServe's management API, with auth keys read from key_file.json.

It refreshes a key that expired (through TorchServe's token API) and retries only what is
safe to retry: reads, and idempotent PUTs, after a dropped connection. Every error answer
becomes a typed exception (``tsfleet.errors``) carrying the server's message.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from tsfleet.errors import ApiError, BadRequest, Unauthorized, Unreachable, api_error
from tsfleet.build.properties import Endpoints


# What a model, version or workflow name may hold in a management path. The names go into
# the path as they are, and both ends resolve what they hold: requests/urllib3 drop "x/.."
# (unregister("x/../intent-classifier", "1.1") went to /models/intent-classifier/1.1), and
# TorchServe decodes "%2F" before it splits the path, so encoding does not help. TorchServe's
# own names (a stand-in's "1.0~swap", a workflow's "pipe__model") all fit.
PATH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.~-]*")


def _named(what: str, *names: str) -> None:
    for name in names:
        if not isinstance(name, str) or not PATH_NAME.fullmatch(name):
            raise BadRequest(what, 400, f"{name!r} is not a name TorchServe takes in a path "
                                        "(a letter or digit, then letters, digits, '_', '-', '.', '~')")


@dataclass(frozen=True)
class Worker:
    id: str
    pid: int | None
    status: str
    start_time: str
    memory_bytes: int


@dataclass(frozen=True)
class VersionState:
    """One registered model version as TorchServe describes it."""

    model: str
    version: str
    url: str
    is_default: bool
    batch_size: int
    max_batch_delay_ms: int
    response_timeout_s: int
    min_workers: int
    max_workers: int
    workers: tuple[Worker, ...]
    pending: int = 0  # requests in the version's queue, not yet given to a worker

    @property
    def ready_workers(self) -> int:
        return sum(w.status == "READY" for w in self.workers)


def _worker(raw: dict) -> Worker:
    pid = raw.get("pid")
    return Worker(str(raw.get("id")), int(pid) if pid not in (None, "", -1) else None,
                  str(raw.get("status", "")), str(raw.get("startTime", "")), int(raw.get("memoryUsage") or 0))


def _version(raw: dict, default: str | None) -> VersionState:
    return VersionState(
        raw["modelName"], str(raw["modelVersion"]), raw.get("modelUrl", ""), raw["modelVersion"] == default,
        int(raw.get("batchSize", 1)), int(raw.get("maxBatchDelay", 100)), int(raw.get("responseTimeout", 120)),
        int(raw.get("minWorkers", 0)), int(raw.get("maxWorkers", 0)),
        tuple(_worker(w) for w in raw.get("workers", [])),
        int((raw.get("jobQueueStatus") or {}).get("pendingRequests", 0)),
    )


class ManagementClient:
    """TorchServe's management API at ``endpoints``, authenticated from ``key_file``."""

    def __init__(self, endpoints: Endpoints, key_file: Path, timeout: float = 30):
        self.ep, self.key_file, self.timeout = endpoints, Path(key_file), timeout
        self.session = requests.Session()
        self._keys: dict[str, str] | None = None

    # ---------------------------------------------------------------- auth
    def _key(self, which: str, reload: bool = False) -> str:
        if self._keys is None or reload:
            try:
                doc = json.loads(self.key_file.read_text())
            except (OSError, ValueError) as exc:
                raise Unreachable(
                    f"cannot read TorchServe's keys from {self.key_file} ({exc.__class__.__name__}); is "
                    "TorchServe running, started from this directory? (--key-file points elsewhere)"
                ) from None
            self._keys = {"management": doc["management"]["key"], "inference": doc["inference"]["key"],
                          "api": doc["API"]["key"]}
        return self._keys[which]

    def refresh_key(self, which: str = "management") -> None:
        """Ask TorchServe for a new ``which`` key (it rewrites key_file.json), then re-read it."""
        resp = self.session.get(f"{self.ep.url('management')}/token", params={"type": which},
                                headers={"Authorization": f"Bearer {self._key('api')}"}, timeout=self.timeout)
        if resp.status_code != 200:
            raise api_error("refreshing the " + which + " key", resp.status_code, resp.text.strip())
        self._key(which, reload=True)

    # ------------------------------------------------------------- transport
    def call(self, method: str, path: str, what: str, params: dict | None = None,
             retry: bool = False, timeout: float | None = None) -> Any:
        """One management call; JSON answer, or a typed ApiError / Unreachable."""
        url = self.ep.url("management") + path
        attempts = 3 if retry else 1
        refreshed = False
        while True:
            try:
                resp = self.session.request(method, url, params=params, timeout=timeout or self.timeout,
                                            headers={"Authorization": f"Bearer {self._key('management')}"})
            except requests.ConnectionError:
                attempts -= 1
                if attempts <= 0:
                    raise Unreachable(f"{what}: TorchServe does not answer at {self.ep.url('management')}") from None
                time.sleep(0.5)
                continue
            except requests.Timeout:
                raise Unreachable(f"{what}: no answer from TorchServe within {timeout or self.timeout:.0f} s") from None
            if resp.status_code < 300:
                return resp.json() if resp.content else {}
            err = api_error(what, resp.status_code, _message(resp))
            if isinstance(err, Unauthorized) and not refreshed:
                # Another process may have renewed it; else it expired and we renew it.
                refreshed = True
                if self._key("management") == self._key("management", reload=True):
                    self.refresh_key("management")
                continue
            raise err

    # -------------------------------------------------------------- models
    def list_models(self) -> list[str]:
        names, token = [], None
        while True:
            params = {"limit": 100, **({"next_page_token": token} if token else {})}
            page = self.call("GET", "/models", "listing models", params, retry=True)
            names += [m["modelName"] for m in page.get("models", [])]
            token = page.get("nextPageToken")
            if not token:
                return names

    def describe(self, model: str, retry: bool = True) -> list[VersionState]:
        """Every registered version of ``model``, the default flagged (``retry``: after a
        dropped connection, twice more)."""
        _named(f"describing {model!r}", model)
        default = self.call("GET", f"/models/{model}", f"describing {model}", retry=retry)
        default_version = str(default[0]["modelVersion"]) if default else None
        raw = self.call("GET", f"/models/{model}/all", f"describing {model}", retry=retry)
        return [_version(r, default_version) for r in raw]

    def state(self) -> dict[str, list[VersionState]]:
        return {name: self.describe(name) for name in self.list_models()}

    def register(self, archive: str, *, batch_size: int | None = None, max_batch_delay_ms: int | None = None,
                 response_timeout_s: int | None = None, initial_workers: int | None = None,
                 model_name: str | None = None, synchronous: bool = True, timeout: float = 300) -> str:
        params: dict[str, Any] = {"url": archive, "synchronous": str(synchronous).lower()}
        for key, value in (("batch_size", batch_size), ("max_batch_delay", max_batch_delay_ms),
                           ("response_timeout", response_timeout_s), ("initial_workers", initial_workers),
                           ("model_name", model_name)):
            if value is not None:
                params[key] = value
        return self.call("POST", "/models", f"registering {archive}", params, timeout=timeout).get("status", "")

    def unregister(self, model: str, version: str, timeout: float = 180) -> None:
        _named(f"unregistering {model!r} {version!r}", model, version)
        self.call("DELETE", f"/models/{model}/{version}", f"unregistering {model} {version}", timeout=timeout)

    def scale(self, model: str, version: str, min_workers: int, max_workers: int | None = None,
              timeout: float = 300) -> None:
        """Set the worker count and wait until TorchServe has done it."""
        _named(f"scaling {model!r} {version!r}", model, version)
        params = {"min_worker": min_workers, "max_worker": max_workers if max_workers is not None else min_workers,
                  "synchronous": "true"}
        self.call("PUT", f"/models/{model}/{version}", f"scaling {model} {version}", params,
                  retry=True, timeout=timeout)

    def set_default(self, model: str, version: str) -> None:
        _named(f"making {model!r} {version!r} the default", model, version)
        self.call("PUT", f"/models/{model}/{version}/set-default", f"making {model} {version} the default",
                  retry=True)

    # ----------------------------------------------------------- workflows
    def list_workflows(self) -> list[str]:
        page = self.call("GET", "/workflows", "listing workflows", {"limit": 100}, retry=True)
        return [w["workflowName"] for w in page.get("workflows", [])]

    def register_workflow(self, archive: str, name: str, timeout: float = 300) -> None:
        self.call("POST", "/workflows", f"registering workflow {name}",
                  {"url": archive, "workflow_name": name}, timeout=timeout)

    def unregister_workflow(self, name: str) -> None:
        _named(f"unregistering workflow {name!r}", name)
        self.call("DELETE", f"/workflows/{name}", f"unregistering workflow {name}", timeout=180)

    # --------------------------------------------------------------- other
    def metrics(self) -> str:
        """The Prometheus text of the metrics port (no key needed)."""
        try:
            return self.session.get(self.ep.url("metrics") + "/metrics", timeout=self.timeout).text
        except requests.ConnectionError:
            raise Unreachable(f"TorchServe's metrics do not answer at {self.ep.url('metrics')}") from None


def _message(resp: requests.Response) -> str:
    try:
        return str(resp.json().get("message", resp.text)).strip()
    except ValueError:
        return resp.text.strip()


__all__ = ["ManagementClient", "VersionState", "Worker", "ApiError"]
