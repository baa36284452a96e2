"""`tsfleet up`: TorchServe, the recycler and the router, started and kept running.

TorchServe, the router and the recycler run as processes of their own. While `up` stays in
the foreground it watches them: a companion that exits is started again (companions.py),
and so is TorchServe, as the manifest declares it, with its workflows; the router's clients
keep their key and get 503 only while it is away. Ctrl-C, SIGTERM or a hang-up stop all
three; so does `tsfleet down` from another shell.
"""
from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from tsfleet.control import companions
from tsfleet.errors import FleetError, ManifestError, NotAllReady, NotFound, VersionDidNotStart, WorkflowDidNotStart
from tsfleet.manifest import Fleet, load_fleet
from tsfleet.build.recipes import ROOT
from tsfleet.control.router_admin import RouterAdmin

if TYPE_CHECKING:
    from tsfleet.control.server import TorchServe

Say = Callable[[str], None]
# TorchServe that keeps dying soon after each start is not started a fifth time: something
# a restart cannot fix (a port taken, a broken archive) needs a person.
MAX_QUICK_RESTARTS = 4
ROUTER_ADMIN = "http://127.0.0.1:8091"  # where `route` (as up starts it by default) serves its admin API


@dataclass(frozen=True)
class UpOptions:
    manifest: str
    timeout: float = 300
    recycler_port: int = 8083
    router_processes: str = "auto"
    router_host: str = "127.0.0.1"
    detach: bool = False
    # The router's ports (`route --port/--grpc-port/--admin-port`): 8090/7090/8091 unless two
    # fleets share a machine (a test run beside another).
    router_port: int = 8090
    router_grpc_port: int = 7090
    router_admin_port: int = 8091

    @property
    def router_admin(self) -> str:
        """The URL of the router's admin API (it listens on loopback only)."""
        return f"http://127.0.0.1:{self.router_admin_port}"


def run(server: TorchServe, fleet: Fleet, options: UpOptions, say: Say) -> int:
    """Start the fleet; unless detached, keep it running until told to stop."""
    _refuse_if_running(server)
    _on_stop_signals(interrupt)
    try:
        started = time.monotonic()
        bring_up(server, fleet, options.timeout, say)
        say(f"fleet ready in {time.monotonic() - started:.1f} s")
        supervisor = _start_companions(server, fleet, options, say)
        if options.detach:
            say("running in the background; `make down` stops it")
            return 0
        say("Ctrl-C stops the fleet; TorchServe, the router or the recycler exiting is started again")
        watch(server, fleet, supervisor, options.timeout, say, manifest=options.manifest,
              router_admin=options.router_admin)
        stop_companions(server)
        say("TorchServe was stopped (tsfleet down); the router and the recycler are stopped too")
        return 0
    except KeyboardInterrupt:
        _finish_stopping()
        say("\nstopping the router, the recycler and TorchServe")
        stop_all(server)
        return 0
    except FleetError:
        _finish_stopping()
        stop_all(server)
        raise


def _refuse_if_running(server: TorchServe) -> None:
    """A second `up` (Ctrl-R, make up "to be sure") must leave a running fleet alone: past
    this point a failure stops the TorchServe and companions it finds, and they are not its own."""
    if server.state() == "running":
        raise FleetError("TorchServe is already running (`tsfleet status` shows it); this up changed "
                         "nothing. `make down` stops it, then `make up` starts the fleet again")
    for name in ("route", "recycle"):
        pid = companions.running(server.workdir, name)
        if pid is not None:
            raise FleetError(f"the {name} companion of a fleet started here still runs (pid {pid}); "
                             "this up changed nothing. `make down` stops it")


def bring_up(server: TorchServe, fleet: Fleet, timeout: float, say: Say, router: RouterAdmin | None = None) -> None:
    """Start TorchServe, take it to ``fleet`` (workflows included) and wait until every
    version has its workers, with the serving path warmed up."""
    say("starting TorchServe")
    server.start()
    deadline = time.monotonic() + timeout
    serving = _converge(server, fleet, deadline, say, router)
    try:
        server.wait_ready(serving, timeout=max(1.0, deadline - time.monotonic()), progress=say)
    except NotAllReady as exc:
        if len(exc.missing) == len(serving.versions()):
            raise  # nothing to serve
        # One broken version (or one the GPU has no room for) must not keep the rest down.
        for model, version in exc.missing:
            why = "its workers keep failing to start" if (model, version) in exc.failing else "not ready in time"
            say(f"  {model} {version}: {why}; serving the rest of the fleet without it. TorchServe keeps "
                f"trying it; the workers' error is in {server.workdir / 'logs' / 'model_log.log'}")
            serving = serving.without(model, version)
    say(f"warmed up the serving path ({server.warm_up(serving)} requests)")


def _converge(server: TorchServe, fleet: Fleet, deadline: float, say: Say, router: RouterAdmin | None) -> Fleet:
    """What config.properties says may be behind the manifest (a version added and applied,
    a promote, a retirement, without `tsfleet config`): `tsfleet apply` closes the gap. It is
    tried again while TorchServe's first workers load (a default needs a ready worker).
    A version whose workers do not start (a broken archive, a GPU without room for it) is
    left out and said, so the rest of the fleet serves: returns the fleet that does."""
    from tsfleet.control.apply import apply

    server.wait_for_keys(deadline)
    said, serving, skip = "", fleet, set()
    while True:
        try:
            apply(fleet, server.client, lambda line: say("  " + line), store=server.model_store,
                  report_dir=server.report_dir, router=router, skip=skip)
            break
        except VersionDidNotStart as exc:
            # Left as the server has it, not retired: a swap's stand-in may still serve it.
            say(f"  {exc.model} {exc.version} did not start; serving the rest of the fleet without it. {exc}")
            skip.add((exc.model, exc.version))
            serving = serving.without(exc.model, exc.version)
        except WorkflowDidNotStart as exc:
            say(f"  workflow {exc.workflow} did not start; serving the rest of the fleet without it. {exc}")
            fleet, serving = fleet.without_workflow(exc.workflow), serving.without_workflow(exc.workflow)
        except FleetError as exc:
            if time.monotonic() >= deadline or server.state() == "died":
                raise FleetError(f"TorchServe could not be taken to the manifest: {exc}") from None
            if str(exc) != said:
                said = str(exc)
                say(f"  not yet: {exc}; trying again while the workers load")
            time.sleep(2)
    if router is not None:
        _drop_dead_aliases(server, router, say)
    return serving


def _drop_dead_aliases(server: TorchServe, router: RouterAdmin, say: Say) -> None:
    """A swap that TorchServe's death cut short left the router sending a version's traffic to
    a stand-in, which the new TorchServe does not have: that traffic goes back to the version."""
    try:
        routes = router.routes()
    except FleetError:
        return  # no router to mend
    for model, route in routes.items():
        aliases = route.get("aliases") or {}
        if not aliases:
            continue
        try:
            have = {v.version for v in server.client.describe(model)}
        except NotFound:
            have = set()
        kept = {version: target for version, target in aliases.items() if target in have}
        if kept != aliases:
            router.call("PUT", f"/routes/{model}", {"aliases": kept})
            gone = ", ".join(f"{v} -> {t}" for v, t in sorted(aliases.items()) if v not in kept)
            say(f"  {model}: the router's aliases to versions TorchServe no longer has are dropped ({gone})")


def _manifest_now(manifest: str, fleet: Fleet, say: Say) -> Fleet:
    """The manifest as it reads now (a promote edits it); ``fleet`` if it no longer loads."""
    try:
        return load_fleet(manifest)
    except ManifestError as exc:
        say(f"{exc}; starting TorchServe as the manifest read when up started")
        return fleet


def watch(server: TorchServe, fleet: Fleet, supervisor: companions.Supervisor, timeout: float, say: Say,
          sleep: Callable[[float], None] = time.sleep, manifest: str | None = None,
          router_admin: str = ROUTER_ADMIN) -> None:
    """Keep the companions and TorchServe running until TorchServe is stopped on purpose.
    TorchServe that died is started again, as ``manifest`` reads then (the router's routes,
    at ``router_admin``, mended); FleetError once it keeps dying."""
    manifest = manifest or str(fleet.root / "fleet.yaml")
    backoff, failed = companions.Backoff(), False
    while True:
        state = "died" if failed else server.state()
        if state == "running":
            supervisor.check()
            sleep(1)  # watching for as long as it runs, no deadline
            continue
        if state == "stopped":
            return
        if not failed:
            sleep(1)  # `torchserve --stop` removes its pid file just after the process has ended
            if server.state() == "stopped" or supervisor.stopped_on_purpose():
                return  # `tsfleet down` (it stops the companions first)
        delay = backoff.exited(quick=failed)
        if backoff.quick_exits > MAX_QUICK_RESTARTS:
            raise FleetError(f"TorchServe keeps exiting soon after its start; see {server.workdir / 'logs'}. "
                             "The router and the recycler were stopped; `make up` starts the fleet again")
        say(f"TorchServe exited unexpectedly (see {server.workdir / 'logs'}); starting it again"
            + (f" in {delay:.0f} s" if delay else "") + "; the router answers 503 meanwhile")
        sleep(delay)
        backoff.restarted()
        server.stop()  # whatever is left of it (its workers, a stale pid file)
        try:
            fleet = _manifest_now(manifest, fleet, say)
            bring_up(server, fleet, timeout, say, RouterAdmin(router_admin, server.workdir / "router_key.json"))
            failed = False
            say("TorchServe is back; the router serves again")
        except FleetError as exc:
            say(f"TorchServe did not come back: {exc}")  # the next try stops what is left of it
            failed = True


def _start_companions(server: TorchServe, fleet: Fleet, options: UpOptions, say: Say) -> companions.Supervisor:
    common = ["--manifest", options.manifest, "--config", str(server.config),
              "--key-file", str(server.workdir / "key_file.json")]
    supervisor = companions.Supervisor(server.workdir, say)
    supervisor.start("recycle", [*common, "recycle", "--metrics-port", str(options.recycler_port)])
    say(f"recycler started (log: logs/recycle.log, metrics: http://127.0.0.1:{options.recycler_port}/metrics)")
    rest, grpc = options.router_port, options.router_grpc_port
    router = supervisor.start("route", [*common, "route", "--processes", options.router_processes,
                                        "--host", options.router_host, "--port", str(rest),
                                        "--grpc-port", str(grpc), "--admin-port", str(options.router_admin_port)])
    host = companions.reachable(options.router_host)
    for port in (rest, grpc):
        if not companions.wait_listening(router, host, port):
            raise FleetError(f"the router did not start listening on {host}:{port}; see logs/route.log")
    say(f"router started: clients use http://{host}:{rest} and gRPC {host}:{grpc} like TorchServe's "
        "8080/7070, with TorchServe's key or the router's own, which does not expire ('inference' in "
        f"{server.workdir / 'router_key.json'}; admin API {options.router_admin}); probes need none: /livez, /readyz, "
        "/readyz?models=all (log: logs/route.log)")
    print_endpoints(server, fleet, f"http://{host}:{rest}", say)
    return supervisor


def stop_companions(server: TorchServe) -> None:
    companions.stop(server.workdir, "route")
    companions.stop(server.workdir, "recycle")


def stop_all(server: TorchServe) -> None:
    stop_companions(server)
    server.stop()


def print_endpoints(server: TorchServe, fleet: Fleet, router: str, say: Say) -> None:
    """Where everything listens, and a copy-paste request per model."""
    ep, key = server.ep, server.workdir / "key_file.json"
    say("")
    say(f"TorchServe is serving the fleet (auth on; keys in {key}).")
    say(f"  inference  {ep.url('inference')}    management {ep.url('management')}")
    say(f"  metrics    {ep.url('metrics')}/metrics    gRPC {ep.host}:{ep.grpc_inference}")
    say("")
    say(f"  KEY=$(python -c \"import json;print(json.load(open('{key}'))['inference']['key'])\")")
    examples = {
        "text-embedder": "-H 'Content-Type: application/json' -d '{\"text\": \"A cat sits on the mat\"}'",
        "intent-classifier": "-H 'Content-Type: application/json' -d '{\"text\": \"book me a flight to Rome\"}'",
        "image-classifier": f"-H 'Content-Type: image/png' --data-binary @{ROOT / 'docs' / 'shape.png'}",
    }
    for model in fleet.models.values():
        body = examples.get(model.name, "-H 'Content-Type: application/json' -d '{...}'")
        say(f"  curl -H \"Authorization: Bearer $KEY\" {body} {ep.url('inference')}/predictions/{model.name}")
    for flow in fleet.workflows.values():
        say(f"  curl -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' "
            f"-d '{{\"text\": \"what is the weather tomorrow\"}}' {ep.url('inference')}/wfpredict/{flow.name}")
    say("")
    for model in list(fleet.models.values())[:1]:
        say("Or through the router, with its own key (it does not expire):")
        say(f"  RKEY=$(python -c \"import json;print(json.load(open('{server.workdir / 'router_key.json'}'))"
            "['inference'])\")")
        body = examples.get(model.name, "-H 'Content-Type: application/json' -d '{...}'")
        say(f"  curl -H \"Authorization: Bearer $RKEY\" {body} {router}/predictions/{model.name}")
        say("")


def interrupt(signum: int, frame: object) -> None:
    # SIGTERM (e.g. from a supervisor) stops the fleet the same way Ctrl-C does.
    raise KeyboardInterrupt


def _stopping(signum: int, frame: object) -> None:
    try:
        print("still stopping the fleet; it takes a few seconds", flush=True)
    except OSError:
        pass  # the terminal went away


def _on_stop_signals(handler: Callable[[int, object], None]) -> None:
    """Ctrl-C, SIGTERM, and the terminal hanging up (unless started under nohup) all stop the
    fleet: its TorchServe, router and recycler run apart and would be left behind."""
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, handler)


def _finish_stopping() -> None:
    """From here on a second Ctrl-C or SIGTERM (a supervisor repeating itself, `make` passing
    it on) must not cut the stop short and leave the router or TorchServe running."""
    _on_stop_signals(_stopping)
