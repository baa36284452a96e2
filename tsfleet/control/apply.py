"""Declarative apply: the steps that take a running TorchServe to the manifest, and doing them.

``plan`` compares the manifest with what TorchServe describes; ``apply`` performs the steps
in a safe order (register and warm new versions, then scale, then switch defaults, then
retire), so no model is ever left without a ready default version. Every step is
idempotent, so after a failure a second apply finishes the job. A change of batch settings
swaps the version through a stand-in (``tsfleet.control.swap``), serving its traffic throughout;
versions leave only once drained.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Collection

from handlers.contract import default_report_dir
from tsfleet.control.client import ManagementClient, VersionState
from tsfleet.errors import ApiError, Conflict, FleetError, ServerFault, VersionDidNotStart, WorkflowDidNotStart
from tsfleet.control.locks import LOCK_WAIT_S, report_dir_of, version_lock
from tsfleet.manifest import Fleet, VersionSpec
from tsfleet.control.swap import RouterLink, Swapper, base_version, is_stand_in

if TYPE_CHECKING:
    from tsfleet.control.router_admin import RouterAdmin

ORDER = ("register", "replace", "scale", "set-default", "unregister", "register-workflow", "unregister-workflow")


@dataclass(frozen=True)
class Step:
    action: str
    model: str
    version: str = ""
    detail: str = ""

    def __str__(self) -> str:
        target = f"{self.model} {self.version}".strip()
        return f"{self.action:<19} {target:<28} {self.detail}".rstrip()


def is_private(name: str, fleet: Fleet) -> bool:
    """Models TorchServe registers for a workflow (``<workflow>__<model>``) belong to it."""
    return any(name.startswith(f"{flow}__") for flow in fleet.workflows)


def _drift(spec: VersionSpec, cur: VersionState) -> list[str]:
    s = spec.serving
    pairs = [("batch_size", cur.batch_size, s.batch_size),
             ("max_batch_delay_ms", cur.max_batch_delay_ms, s.max_batch_delay_ms),
             ("response_timeout_s", cur.response_timeout_s, s.response_timeout_s)]
    return [f"{name} {have} -> {want}" for name, have, want in pairs if have != want]


def plan(fleet: Fleet, state: dict[str, list[VersionState]], workflows: list[str]) -> list[Step]:
    """The steps, in the order apply runs them; empty when the server matches the manifest."""
    steps: list[Step] = []
    for model in fleet.models.values():
        current = {v.version: v for v in state.get(model.name, [])}
        for version, spec in model.versions.items():
            cur = current.get(version)
            s = spec.serving
            if cur is None:
                steps.append(Step("register", model.name, version,
                                  f"{spec.archive_name}, {s.workers} workers, batch {s.batch_size}/{s.max_batch_delay_ms} ms"))
                continue
            drift = _drift(spec, cur)
            if drift:
                steps.append(Step("replace", model.name, version, "; ".join(drift) + " (via a stand-in)"))
            elif (cur.min_workers, cur.max_workers) != (s.workers, s.worker_ceiling):
                steps.append(Step("scale", model.name, version, f"workers {cur.min_workers} -> {s.workers}"))
        current_default = next((v.version for v in current.values() if v.is_default), None)
        if current_default != model.default_version:
            steps.append(Step("set-default", model.name, model.default_version, f"was {current_default or 'none'}"))
        # A leaving default is no longer the default by then: set-default runs first.
        replaced = {s.version for s in steps if s.action == "replace" and s.model == model.name}
        for v in current.values():
            if v.version in model.versions:
                continue
            if is_stand_in(v.version):
                if base_version(v.version) not in replaced:  # else the replace retires it
                    steps.append(Step("unregister", model.name, v.version, "stand-in of an interrupted swap"))
            else:
                steps.append(Step("unregister", model.name, v.version, "left the manifest"))
    for name, versions in state.items():
        if name in fleet.models or is_private(name, fleet):
            continue
        for v in sorted(versions, key=lambda v: v.is_default):  # the default can only go last
            steps.append(Step("unregister", name, v.version, "model left the manifest"))
    for flow in fleet.workflows.values():
        if flow.name not in workflows:
            steps.append(Step("register-workflow", flow.name, "", flow.archive_name))
    for name in workflows:
        if name not in fleet.workflows:
            steps.append(Step("unregister-workflow", name, "", "left the manifest"))
    return sorted(steps, key=lambda step: ORDER.index(step.action))


def current_plan(fleet: Fleet, client: ManagementClient) -> list[Step]:
    return plan(fleet, client.state(), client.list_workflows())


# Steps that change the workers of a version the recycler may be replacing one of.
LOCKED = ("replace", "scale", "unregister")


def _run_step(step: Step, fleet: Fleet, client: ManagementClient, swapper: Swapper,
              progress: Callable[[str], None] = print) -> None:
    if step.action not in LOCKED:
        _change(step, fleet, client, swapper)
        return
    version = base_version(step.version)  # a stand-in is locked under the version it stands in for
    model = fleet.models.get(step.model)
    spec = model.versions.get(version) if model else None
    folder = report_dir_of(spec, swapper.report_dir) if spec else swapper.report_dir
    with version_lock(folder, step.model, version, LOCK_WAIT_S,
                      lambda: progress(f"  waiting for the recycler to finish with {step.model} {version}")) as mine:
        if not mine:
            raise FleetError(f"{step.model} {version} stayed locked by a worker replacement for {LOCK_WAIT_S:.0f} s")
        _change(step, fleet, client, swapper)


def _change(step: Step, fleet: Fleet, client: ManagementClient, swapper: Swapper) -> None:
    if step.action == "register":
        swapper.register(fleet.models[step.model].versions[step.version])
    elif step.action == "replace":
        swapper.swap(fleet.models[step.model].versions[step.version])
    elif step.action == "scale":
        s = fleet.models[step.model].versions[step.version].serving
        client.scale(step.model, step.version, s.workers, s.worker_ceiling)
    elif step.action == "set-default":
        target = {v.version: v for v in client.describe(step.model)}.get(step.version)
        if target is None or target.ready_workers == 0:
            raise FleetError(f"{step.model} {step.version} has no ready worker; not making it the default")
        client.set_default(step.model, step.version)
    elif step.action == "unregister":
        model = fleet.models.get(step.model)
        base = model.versions.get(base_version(step.version)) if model else None
        if is_stand_in(step.version):
            # An interrupted swap may have left the router sending the version's traffic to
            # this stand-in; the version is back by now (the plan registers it first).
            swapper.router.set_alias(step.model, {})
        swapper.retire(step.model, step.version, base if is_stand_in(step.version) else None)
    elif step.action == "register-workflow":
        try:
            client.register_workflow(fleet.workflows[step.model].archive_name, step.model)
        except Conflict:
            pass
        except ServerFault as exc:  # its model copies did not start; TorchServe may keep a part
            try:
                client.unregister_workflow(step.model)
            except FleetError:
                pass  # nothing of it was kept
            raise WorkflowDidNotStart(step.model, f"workflow {step.model} did not start: {exc}. The workers' "
                                      "error is in logs/model_log.log where TorchServe runs") from None
    elif step.action == "unregister-workflow":
        client.unregister_workflow(step.model)


def apply(fleet: Fleet, client: ManagementClient, progress: Callable[[str], None] = print, *,
          store: Path | None = None, report_dir: Path | None = None,
          router: "RouterAdmin | None" = None, skip: Collection[tuple[str, str]] = ()) -> list[Step]:
    """Perform the plan; stop at the first failed step with a message naming it.

    ``store`` holds the archives (default: the fleet's model_store), ``report_dir`` the
    workers' reports (default: theirs), ``router`` is a ``RouterAdmin`` to keep a running
    router's traffic on a version while its settings are swapped, and to bring its routes
    to the manifest.
    """

    link = RouterLink(router, progress)
    swapper = Swapper(client, store or fleet.root / "model_store", report_dir or default_report_dir(), link, progress)
    # Versions to leave as the server has them, stand-ins included (up: ones that did not start).
    steps = [s for s in current_plan(fleet, client) if (s.model, base_version(s.version)) not in skip]
    # The router moves to the manifest once new versions are ready and defaults set, and
    # before anything is retired, so it never sends traffic to a version that is gone.
    routed = next((n for n, s in enumerate(steps, 1) if s.action == "unregister"), len(steps) + 1)
    if any(s.action in ("replace", "unregister") for s in steps):
        link.check()
    for n, step in enumerate(steps, 1):
        if n == routed:
            try:
                link.take_fleet(fleet, skip, before_retiring=True)
            except FleetError as exc:
                raise FleetError(f"before step {n} of {len(steps)} ({step.action} {step.model} {step.version}): "
                                 f"{exc}. Steps before it are done.") from None
        progress(f"[{n}/{len(steps)}] {step}")
        try:
            _run_step(step, fleet, client, swapper, progress)
        except (ApiError, FleetError) as exc:
            message = (f"step {n} of {len(steps)} failed ({step.action} {step.model} {step.version}): {exc}. "
                       "Steps before it are done; fix the cause and run apply again to finish.")
            if isinstance(exc, (VersionDidNotStart, WorkflowDidNotStart)):
                exc.args = (message,)  # keeps what did not start, for up to leave it out
                raise exc from None
            raise FleetError(message) from None
    if routed > len(steps):
        link.take_fleet(fleet, skip)
    return steps
