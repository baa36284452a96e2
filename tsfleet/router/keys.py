"""A client key that does not expire every hour: the router's own inference key.

TorchServe's inference key expires (``token_expiration_min``, 60 minutes by default) and a
renewal replaces it at once, so a client that read key_file.json when it started fails an
hour later (400 over REST, PERMISSION_DENIED over gRPC). A client may send the router's
key instead (``inference`` in router_key.json): the router puts TorchServe's current key in
its place. It renews that key through TorchServe's token API shortly before it expires,
and should TorchServe refuse it anyway (renewed by someone else, or a restarted TorchServe)
it re-reads key_file.json and tries the request once more. A client that sends TorchServe's
own key is passed on untouched, as before.

Several router processes share one TorchServe: a lock on key_file.json lets one of them
renew while the others read what it wrote.
"""
from __future__ import annotations

import asyncio
import fcntl
import hmac
import json
import logging
import os
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from tsfleet.errors import FleetError
from tsfleet.files import write_atomically

log = logging.getLogger(__name__)
# TorchServe's words when it refuses a key: in a 400's body (REST), in PERMISSION_DENIED's message (gRPC).
REFUSED = "Token Authorization failed"
REFUSED_BYTES = REFUSED.encode()
RENEW_TIMEOUT_S = 10.0
MAX_MARGIN_S = 60.0  # renew this long before expiry (a fifth of the key's life if that is shorter)
# Loopback calls to TorchServe must never go through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class UpstreamKey:
    """TorchServe's inference key as its key file gives it."""

    key: str
    expires: float  # epoch seconds
    lifetime: float  # seconds: the expiry less the time the file was written
    api: str  # the token API's key, which renews it

    @property
    def header(self) -> bytes:
        return b"Bearer " + self.key.encode()

    def renew_at(self) -> float:
        return self.expires - min(MAX_MARGIN_S, self.lifetime / 5)


def read_upstream_key(path: Path) -> UpstreamKey | None:
    """The inference key in TorchServe's key file; None when there is none (TorchServe not
    started, token auth off) or it is being rewritten."""
    try:
        with open(path, encoding="utf-8") as fh:
            written = os.fstat(fh.fileno()).st_mtime
            doc = json.load(fh)
        expires = datetime.fromisoformat(doc["inference"]["expiration time"]).timestamp()
        return UpstreamKey(doc["inference"]["key"], expires, max(expires - written, 0.0), doc["API"]["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _read_settled(path: Path, attempts: int = 20) -> UpstreamKey | None:
    # TorchServe truncates the file and writes it again: a read may catch it half-written.
    for _ in range(attempts):
        key = read_upstream_key(path)
        if key is not None or not path.exists():
            return key
        time.sleep(0.05)
    return None


def _renew(management_url: str, api: str) -> bool:
    request = urllib.request.Request(f"{management_url}/token?type=inference",
                                     headers={"Authorization": f"Bearer {api}"})
    try:
        with _OPENER.open(request, timeout=RENEW_TIMEOUT_S) as resp:
            resp.read()
        return True
    except (urllib.error.URLError, OSError) as exc:
        log.warning("router: cannot renew TorchServe's inference key at %s: %s", management_url, exc)
        return False


def refreshed(key_file: Path, management_url: str, refused: str | None) -> UpstreamKey | None:
    """The key to use now (blocking: run it in a thread). It is renewed first when TorchServe
    refused ``refused`` and the file still holds it, or (``refused`` None) when it is about to
    expire. The lock makes router processes take turns, so only the first of them renews."""
    try:
        fd = os.open(key_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        current = _read_settled(key_file)
        if current is None:
            return None
        stale = current.key == refused if refused is not None else time.time() >= current.renew_at()
        if not stale or not _renew(management_url, current.api):
            return current
        renewed = _read_settled(key_file) or current
        log.info("router: renewed TorchServe's inference key (valid until %s)",
                 datetime.fromtimestamp(renewed.expires).isoformat(timespec="seconds"))
        return renewed
    finally:
        os.close(fd)  # and with it the lock


def router_keys(path: Path) -> dict[str, Any]:
    """The router's tokens in ``path``: ``admin`` (its admin API) and ``inference`` (clients'),
    and, for a while after rotations, ``previous_inference``. Made where missing, readable
    by the owner only."""
    try:
        keys = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(keys, dict) or not all(isinstance(keys.get(k, ""), str) for k in ("admin", "inference")):
            raise ValueError("expected {\"admin\": KEY, \"inference\": KEY}")
    except ValueError as exc:
        raise FleetError(f"{path} is not the router's key file ({exc}); fix it, or move it away to have "
                         "new keys made") from None
    missing = [name for name in ("admin", "inference") if name not in keys]
    if missing:
        keys.update({name: secrets.token_urlsafe(24) for name in missing})
        _write_private(path, keys)
    return keys


def previous_keys(keys: dict[str, Any]) -> list[tuple[str, float]]:
    """(key, epoch seconds until which it is still taken) for each key that rotations replaced
    and whose grace is not over, oldest first."""
    previous = keys.get("previous_inference") or []
    if isinstance(previous, dict):  # an older router's file: one previous key
        previous = [previous]
    now, kept = time.time(), []
    for entry in previous if isinstance(previous, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("key"), str) and isinstance(entry.get("until"), (int, float)):
            if entry["until"] > now:
                kept.append((entry["key"], float(entry["until"])))
    return kept


def rotate_router_key(path: Path, grace_s: float) -> dict[str, Any]:
    """A new router inference key in ``path``; the one it replaces is still taken for
    ``grace_s`` seconds, so clients can move over, and so are keys earlier rotations replaced
    until their own grace ends. ``grace_s`` 0 (a key that leaked) drops every old key at once.
    Returns the file's new content."""
    keys = router_keys(path)
    kept = previous_keys(keys) + [(keys["inference"], time.time() + grace_s)] if grace_s > 0 else []
    keys["previous_inference"] = [{"key": key, "until": until} for key, until in kept]
    keys["inference"] = secrets.token_urlsafe(24)
    _write_private(path, keys)
    return keys


def _write_private(path: Path, doc: dict[str, Any]) -> None:
    write_atomically(path, json.dumps(doc), private=True)


class InferenceKeys:
    """Swaps the router's inference key for TorchServe's current one, kept fresh."""

    def __init__(self, router_key: str, key_file: Path, management_url: str,
                 previous: list[tuple[str, float]] = ()):
        self.take(router_key, previous)
        self.key_file, self.management_url = Path(key_file), management_url.rstrip("/")
        self.current = read_upstream_key(self.key_file)
        self._inflight: dict[str | None, asyncio.Future] = {}
        self.refusals = 0  # of the key swapped in, by TorchServe: each is tried once more
        self._warned = -60.0

    def take(self, router_key: str, previous: list[tuple[str, float]] = ()) -> None:
        """Take ``router_key`` from clients from now on (and each of ``previous`` until its time)."""
        self.presented = b"Bearer " + router_key.encode()
        self.previous = tuple((b"Bearer " + key.encode(), until) for key, until in previous)

    def reload(self, router_key_file: Path) -> None:
        """Take the keys ``router_key_file`` holds now (after a rotation)."""
        keys = router_keys(router_key_file)
        self.take(keys["inference"], previous_keys(keys))

    def is_current(self, presented: bytes) -> bool:
        """``presented`` is the router's key now (not one a rotation replaced, whose grace
        ends with time): what ``swap`` makes of it holds until ``presented``, ``previous`` or
        ``current`` is replaced."""
        return hmac.compare_digest(presented.strip(), self.presented)

    def swap(self, presented: bytes | None) -> bytes | None:
        """The Authorization value to send TorchServe when a client sent ``presented``; None
        when that is not the router's key (it then goes on as it is)."""
        if presented is None:
            return None
        presented = presented.strip()
        if not hmac.compare_digest(presented, self.presented):
            if not self.previous or not any(hmac.compare_digest(presented, key) and time.time() < until
                                            for key, until in self.previous):
                return None
        current = self.current
        # Unknown yet (TorchServe started after the router): TorchServe refuses it, and the
        # retry after the refusal reads the key file.
        return current.header if current is not None else presented.strip()

    async def refused(self, sent: bytes) -> bytes | None:
        """TorchServe refused ``sent`` (what ``swap`` gave): what to try once more, or None
        when there is nothing better."""
        self.refusals += 1
        current = self.current
        if current is None or current.header == sent:
            current = await self._refresh(sent.removeprefix(b"Bearer ").decode("latin-1"))
        if current is None and time.monotonic() >= self._warned + 60:
            self._warned = time.monotonic()  # once a minute: a client may retry in a tight loop
            log.warning("router: TorchServe refused a request sent with the router's key, and its key file %s "
                        "cannot be read: start the router where TorchServe was started, or give --key-file",
                        self.key_file)
        return current.header if current is not None and current.header != sent else None

    async def _refresh(self, refused: str | None) -> UpstreamKey | None:
        # One refresh at a time per refused key: a burst of refusals waits for the same one.
        task = self._inflight.get(refused)
        if task is None:
            task = asyncio.ensure_future(asyncio.to_thread(refreshed, self.key_file, self.management_url, refused))
            self._inflight[refused] = task
            task.add_done_callback(lambda done: self._inflight.pop(refused, None)
                                   if self._inflight.get(refused) is done else None)
        key = await asyncio.shield(task)
        if key is not None:
            self.current = key
        return key

    def collect(self) -> Iterator[Metric]:
        """Seconds until TorchServe's inference key expires, as this router sees it: an alert
        on it going low catches renewals that fail (a Prometheus collector)."""
        current = self.current
        gauge = GaugeMetricFamily("tsfleet_router_torchserve_key_expires_in_seconds",
                                  "Seconds until the TorchServe inference key the router sends expires (renewed a "
                                  "minute ahead).")
        if current is not None:
            gauge.add_metric((), round(current.expires - time.time(), 1))
        yield gauge

    def prometheus(self) -> str:
        """``collect`` as /metrics text (each process's own: each renews its own copy)."""
        return generate_latest(self).decode()

    async def keep_fresh(self, period_s: float = 5.0) -> None:
        """Renew TorchServe's key shortly before it expires, and take up keys renewed
        elsewhere (another router process, a restarted TorchServe). Runs until cancelled."""
        while True:
            await asyncio.sleep(self._next_check(period_s))
            try:
                await self._refresh(None)
            except Exception:  # noqa: BLE001 - a failed refresh must not end the refreshing
                log.exception("router: refreshing TorchServe's inference key failed")

    def _next_check(self, period_s: float) -> float:
        current, now = self.current, time.time()
        if current is None or now >= current.renew_at():  # none yet, or its renewal failed: not in a loop
            return period_s
        return min(period_s, max(0.05, current.renew_at() - now))
