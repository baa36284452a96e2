"""Changing a registered version's batch settings with no failed request.

TorchServe fixes batch_size, max_batch_delay and response_timeout at registration, so the
only way to change them is to register the version again. Done naively, that is a gap in
service. Instead, apply moves the version's traffic aside first:

1. register a stand-in (``1.0~swap``: the same archive, its manifest renamed) with the new
   settings and let it warm up;
2. point the router's alias for ``1.0`` at it and, if ``1.0`` was the default, make the
   stand-in the default, so new requests go there;
3. drain ``1.0`` (its queue empty and every worker idle, as the workers themselves report)
   and unregister it;
4. register ``1.0`` again with the new settings, make it the default again, drop the alias;
5. drain and unregister the stand-in.

Each phase checks what is already done, so an interrupted swap is finished by the next
apply (the plan shows a leftover stand-in as a version to unregister).
"""
from __future__ import annotations

import json
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection

from handlers.contract import DRAIN_FLAG, state_path
from tsfleet.control.client import ManagementClient, VersionState
from tsfleet.errors import Conflict, FleetError, NoRouter, NotFound, ServerFault, VersionDidNotStart
from tsfleet.files import replacing
from tsfleet.manifest import Fleet, VersionSpec

if TYPE_CHECKING:
    from tsfleet.control.router_admin import RouterAdmin

SUFFIX = "~swap"
HEAR_WITHIN_S = 3.0  # workers look for the flag every 0.2 s


def stand_in(version: str) -> str:
    return version + SUFFIX


def is_stand_in(version: str) -> bool:
    return version.endswith(SUFFIX)


def base_version(version: str) -> str:
    return version.removesuffix(SUFFIX)


def stand_in_archive(spec: VersionSpec) -> str:
    return f"{spec.model}-{spec.version}.swap.mar"


def derive_archive(store: Path, spec: VersionSpec) -> str:
    """Write a copy of ``spec``'s archive whose MANIFEST names the stand-in version."""
    src_path, dest = store / spec.archive_name, store / stand_in_archive(spec)
    if not src_path.is_file():
        raise FleetError(f"{spec.model} {spec.version}: archive {src_path} is missing; run `tsfleet build`")
    # Written beside it and renamed: a full disk leaves no half archive for TorchServe to load.
    with replacing(dest) as tmp, zipfile.ZipFile(src_path) as src, zipfile.ZipFile(tmp, "w") as out:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = stand_in(spec.version)
                data = json.dumps(manifest, indent=2).encode()
            out.writestr(info, data)  # same entry metadata: the copy is reproducible too
    return dest.name


class RouterLink:
    """The router's alias for a version, if a router runs; apply works without one."""

    def __init__(self, admin: "RouterAdmin | None", progress: Callable[[str], None]):
        self.admin, self.progress, self._warned = admin, progress, False

    def set_alias(self, model: str, aliases: dict[str, str]) -> None:
        if self.admin is None:
            return
        try:
            self.admin.call("PUT", f"/routes/{model}", {"aliases": aliases})
        except FleetError as exc:  # not running, or serving another fleet
            self._no_router(exc)

    def check(self) -> None:
        """Raise when a router is there but cannot be told of changes (its admin key is not
        readable here, it answers errors): a swap or a retirement would then take a version
        away from under its traffic. No router listening is fine: TorchServe serves alone."""
        if self.admin is None:
            return
        try:
            self.admin.routes()
        except NoRouter as exc:
            self._no_router(exc)
        except FleetError as exc:
            raise FleetError(f"the router cannot be told of changes ({exc}); apply changes nothing that would take "
                             "a version away from under its traffic. Fix that and run apply again") from None

    def take_fleet(self, fleet: Fleet, skip: Collection[tuple[str, str]] = (), before_retiring: bool = False) -> None:
        """Bring the router's routes to ``fleet`` (router/manifest_routes.py), saying what
        changed. A router that is there but does not take them stops an apply that is about
        to retire versions it may still send traffic to (its clients would get 404s)."""
        from tsfleet.router.policy.manifest_routes import fleet_routes

        if self.admin is None:
            return
        try:
            changes = self.admin.call("PUT", "/fleet", fleet_routes(fleet, skip))["changes"]
        except NoRouter as exc:
            self._no_router(exc)
            return
        except FleetError as exc:
            if before_retiring:
                raise FleetError(f"the router did not take the manifest's routes ({exc}), so nothing is retired "
                                 "that it may still send traffic to; fix that and run apply again") from None
            self.progress(f"  (the router did not take the manifest's routes: {exc})")
            return
        for line in changes:
            self.progress(f"  router: {line}")

    def _no_router(self, exc: FleetError) -> None:
        if not self._warned:
            self._warned = True
            self.progress(f"  (no router: {exc}; only TorchServe's own clients are covered)")


@dataclass
class Swapper:
    """Does the swap for one version; the store holds the archives, report_dir the workers' reports."""

    client: ManagementClient
    store: Path
    report_dir: Path
    router: RouterLink
    progress: Callable[[str], None] = print
    drain_timeout_s: float = 60.0

    def _versions(self, model: str) -> dict[str, VersionState]:
        try:
            return {v.version: v for v in self.client.describe(model)}
        except NotFound:
            return {}

    def register(self, spec: VersionSpec, archive: str | None = None, version: str | None = None) -> None:
        """Register ``spec`` (or its stand-in: ``archive``, ``version``) with its manifest settings."""
        archive, version = archive or spec.archive_name, version or spec.version
        s = spec.serving
        try:
            self.client.register(archive, batch_size=s.batch_size, max_batch_delay_ms=s.max_batch_delay_ms,
                                 response_timeout_s=s.response_timeout_s, initial_workers=s.workers)
        except Conflict:
            pass  # registered by an earlier, interrupted apply
        except ServerFault as exc:
            # TorchServe answers 500 "Failed to start workers" and, more often than not, keeps
            # the version, with no worker (and as the default of a model new to it): take it out.
            try:
                self.client.unregister(spec.model, version)
                left = "it is unregistered again, so the server is as it was"
            except NotFound:
                left = "TorchServe did not keep it, so the server is as it was"
            except FleetError as cleanup:
                left = f"unregistering it failed too ({cleanup})"
            if exc.server_message.startswith("Failed to save model"):
                # An I/O error reading or unpacking the archive (corrupt, truncated): no worker
                # ever ran, so model_log.log has nothing to say; a build makes it again.
                raise VersionDidNotStart(spec.model, spec.version, f"{spec.model} {version} was not registered: "
                                         f"{exc}; {left}. TorchServe could not unpack {archive} (corrupt or "
                                         "truncated?): `tsfleet build` makes it again") from None
            raise VersionDidNotStart(spec.model, spec.version, f"{spec.model} {version} did not start: {exc}; "
                                     f"{left}. The workers' error is in logs/model_log.log where TorchServe runs") from None
        if s.worker_ceiling != s.workers:
            self.client.scale(spec.model, version, s.workers, s.worker_ceiling)

    def swap(self, spec: VersionSpec) -> None:
        """Re-register ``spec`` with its manifest settings, its traffic served throughout."""
        model, version, temp = spec.model, spec.version, stand_in(spec.version)
        current = self._versions(model)
        was_default = any(current[v].is_default for v in (version, temp) if v in current)
        if version in current:
            if temp not in current:
                self.progress(f"  warming stand-in {model} {temp}")
                self.register(spec, derive_archive(self.store, spec), temp)
            self.router.set_alias(model, {version: temp})
            if was_default:
                self.client.set_default(model, temp)
            self.retire(model, version, spec)
        self.progress(f"  registering {model} {version} with the new settings")
        self.register(spec)
        if was_default:
            self.client.set_default(model, version)
        self.router.set_alias(model, {})
        self.retire(model, temp, spec)

    def retire(self, model: str, version: str, spec: VersionSpec | None = None) -> None:
        """Drain a version that no longer gets new traffic, then unregister it (``spec``: the
        manifest version it stands in for or is, whose settings name its report dir)."""
        state = self._versions(model).get(version)
        if state is None:
            return
        if not state.is_default:
            quiet = state.max_batch_delay_ms / 1000 + 0.05
            reports = Path(spec.settings.get("report_dir") or self.report_dir) if spec else self.report_dir
            why = drain(self.client, model, version, reports, quiet, self.drain_timeout_s)
            if why:
                self.progress(f"  {model} {version} not drained: {why}; unregistering anyway")
        self.progress(f"  unregistering {model} {version}")
        try:
            self.client.unregister(model, version)
        except NotFound:
            pass
        if is_stand_in(version) and spec is not None:
            (self.store / stand_in_archive(spec)).unlink(missing_ok=True)


def _idle_snapshot(client: ManagementClient, model: str, version: str, folder: Path,
                   since: float) -> tuple[tuple | None, bool]:
    """(pid, requests served) of every worker if the version holds no work now, else None;
    and whether any worker answered the drain flag at all."""
    state = {v.version: v for v in client.describe(model)}.get(version)
    if state is None:
        return (), True
    busy, heard, seen = bool(state.pending), False, []
    for worker in state.workers:
        if worker.pid is None:
            continue
        try:
            doc = json.loads(state_path(folder, worker.pid).read_text())
        except (OSError, ValueError):
            busy = True
            continue
        at = float(doc.get("at", 0))
        fresh = at >= since and at >= time.time() - 1.0  # else the worker stopped watching
        heard = heard or fresh
        busy = busy or not (fresh and doc.get("idle"))
        seen.append((worker.pid, doc.get("requests")))
    return (None if busy else tuple(sorted(seen))), heard


def drain(client: ManagementClient, model: str, version: str, report_dir: Path,
          quiet_s: float, timeout_s: float) -> str | None:
    """Wait until TorchServe holds no request of ``version``: its queue empty and all its
    workers idle, seen twice ``quiet_s`` apart (longer than a batch takes to gather) with
    no request served in between. None when drained, else why not."""

    folder = report_dir / model / version
    folder.mkdir(parents=True, exist_ok=True)
    flag = folder / DRAIN_FLAG
    flag.touch()
    since = time.time()
    started = time.monotonic()
    try:
        last: tuple | None = None
        heard_any = False
        while time.monotonic() - started < timeout_s:
            snap, heard = _idle_snapshot(client, model, version, folder, since)
            heard_any = heard_any or heard
            if snap is not None and snap == last:
                return None
            if not heard_any and time.monotonic() - started > HEAR_WITHIN_S:
                return (f"its workers do not report to {report_dir} (pass the report dir they use, "
                        "--report-dir)")
            last = snap
            time.sleep(quiet_s if snap is not None else 0.02)
        return f"still busy after {timeout_s:.0f} s (a client names it explicitly?)"
    finally:
        flag.unlink(missing_ok=True)
