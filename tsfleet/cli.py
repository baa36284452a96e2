"""tsfleet: build, configure and serve the fleet. A thin layer over the library modules."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from handlers.contract import default_report_dir
from tsfleet.errors import FleetError
from tsfleet.files import write_atomically
from tsfleet.manifest import Fleet, load_fleet
from tsfleet.build.properties import Endpoints, render_properties
from tsfleet.build.recipes import ROOT

if TYPE_CHECKING:  # imported lazily below: `tsfleet --help` should not pay for them
    import http.server

    from tsfleet.control.client import ManagementClient
    from tsfleet.control.router_admin import RouterAdmin
    from tsfleet.control.server import TorchServe


def _say(line: str) -> None:
    try:
        print(line, flush=True)
    except OSError:
        pass  # the terminal went away (a dropped SSH session): the logs still say it all


def cmd_build(args: argparse.Namespace, fleet: Fleet) -> int:
    from tsfleet.build.archive import Builder

    started = time.monotonic()
    built = Builder(fleet, Path(args.model_store), Path(args.cache), _say).build_all()
    fresh = sum(b.rebuilt for b in built)
    _say(f"{len(built)} archives in {args.model_store} ({fresh} rebuilt) in {time.monotonic() - started:.0f} s")
    return 0


def cmd_config(args: argparse.Namespace, fleet: Fleet) -> int:
    text = render_properties(fleet)
    target = Path(args.output)
    if args.check:
        if not target.is_file() or target.read_text() != text:
            print(f"{target} is out of date with {args.manifest}; run `tsfleet config`", file=sys.stderr)
            return 1
        _say(f"{target} matches {args.manifest}")
        return 0
    write_atomically(target, text)
    _say(f"wrote {target}")
    return 0


def _server(args: argparse.Namespace) -> "TorchServe":
    from tsfleet.control.server import TorchServe

    config = Path(args.config).resolve()
    if not config.is_file():
        raise FleetError(f"{config}: no such config file; run `tsfleet config`")
    return TorchServe(Path.cwd(), config, Path(args.model_store).resolve(), Endpoints.from_properties(config))


def cmd_up(args: argparse.Namespace, fleet: Fleet) -> int:
    from tsfleet.control import up
    if not args.no_build:
        cmd_build(args, fleet)
    return up.run(_server(args), fleet, up.UpOptions(
        manifest=args.manifest, timeout=args.timeout, recycler_port=args.recycler_port,
        router_processes=args.router_processes, router_host=args.router_host, detach=args.detach,
        router_port=args.router_port, router_grpc_port=args.router_grpc_port,
        router_admin_port=args.router_admin_port), _say)


def _client(args: argparse.Namespace) -> "ManagementClient":
    from tsfleet.control.client import ManagementClient

    config = Path(args.config)
    if not config.is_file():
        raise FleetError(f"{config}: no such config file; run `tsfleet config`")
    return ManagementClient(Endpoints.from_properties(config), Path(args.key_file))


def cmd_plan(args: argparse.Namespace, fleet: Fleet) -> int:
    from tsfleet.control.apply import current_plan

    steps = current_plan(fleet, _client(args))
    routed = _router_preview(args, fleet)
    if not steps and not routed:
        _say("nothing to do: the server matches the manifest")
    for step in steps:
        _say(str(step))
    for line in routed:
        _say(f"router: {line}")
    return 0


def _router_preview(args: argparse.Namespace, fleet: Fleet) -> list[str]:
    """What apply would change in a running router's routes; nothing when none runs."""
    from tsfleet.errors import NoRouter
    from tsfleet.router.policy.manifest_routes import fleet_routes, preview

    try:
        return preview(_admin(args).routes(), fleet_routes(fleet))
    except NoRouter:
        return []
    except FleetError as exc:  # there, but not to be told: apply would stop before swapping or retiring
        return [f"cannot be told of changes ({exc}); apply stops before it swaps or retires anything"]


def cmd_apply(args: argparse.Namespace, fleet: Fleet) -> int:
    from tsfleet.control.apply import apply

    steps = apply(fleet, _client(args), _say, store=Path(args.model_store),
                  report_dir=Path(args.report_dir) if args.report_dir else None, router=_admin(args))
    _say(f"applied {len(steps)} step(s)" if steps else "nothing to do: the server matches the manifest")
    return 0


def cmd_status(args: argparse.Namespace, fleet: Fleet) -> int:
    from tsfleet.control.status import as_json, collect, render

    doc = collect(fleet, _client(args), Path(args.report_dir) if args.report_dir else None)
    _say(as_json(doc) if args.json else render(doc))
    return 0


def _metrics_server(host: str, port: int, metrics: Callable[[], str]) -> "http.server.ThreadingHTTPServer":
    """The recycler's Prometheus endpoint (metrics_http.py), serving in a daemon thread."""
    from tsfleet.control.metrics_http import serve_metrics

    return serve_metrics(host, port, metrics)


def cmd_recycle(args: argparse.Namespace, fleet: Fleet) -> int:
    from tsfleet.control import up
    from tsfleet.control.recycle import Recycler, watched as recycle_watched

    recycler = Recycler(fleet, _client(args), Path(args.report_dir) if args.report_dir else default_report_dir(),
                        _say, manifest=Path(args.manifest))
    if args.metrics_port:
        _metrics_server(args.metrics_host, args.metrics_port, recycler.metrics)
        shown = f"[{args.metrics_host}]" if ":" in args.metrics_host else args.metrics_host
        _say(f"recycler metrics at http://{shown}:{args.metrics_port}/metrics")
    _say("recycling " + recycle_watched(fleet))
    signal.signal(signal.SIGTERM, up.interrupt)
    try:
        recycler.run(args.interval)
    except KeyboardInterrupt:
        _say("recycler stopped")
    return 0


def _admin(args: argparse.Namespace) -> "RouterAdmin":
    from tsfleet.control.router_admin import RouterAdmin

    return RouterAdmin(args.router_admin, Path(args.router_key_file))


def _processes_arg(text: str) -> str:
    """``auto`` or a count of at least 1, checked when the command line is read (and passed
    on as given: ``up`` hands it to ``route``)."""
    from tsfleet.router.processes import process_count

    try:
        process_count(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def cmd_route(args: argparse.Namespace, fleet: Fleet) -> int:
    from tsfleet.build.properties import read_properties
    from tsfleet.router.app import RouterConfig, serve
    from tsfleet.router.processes import process_count
    from tsfleet.router.wire.limits import under_torchserve

    config = Path(args.config)
    ep = Endpoints.from_properties(config) if config.is_file() else Endpoints()
    # A gRPC request TorchServe would only reset is refused by the router (limits.under_torchserve).
    ts_max = read_properties(config).get("max_request_size") if config.is_file() else None
    limits = under_torchserve(fleet.router_limits, int(ts_max) if ts_max and ts_max.isdigit() else None)
    if args.routes_configmap and not args.routes_file:
        raise FleetError("--routes-configmap names where the routes file's content lives: give --routes-file too")
    # The pod's environment names the ConfigMap (k8s/base/deployment.yaml); it counts only with a routes file.
    configmap = args.routes_configmap or os.environ.get("TSFLEET_ROUTES_CONFIGMAP") or None
    serve(fleet, RouterConfig(upstream_rest=ep.url("inference"), upstream_grpc=f"{ep.host}:{ep.grpc_inference}",
                              upstream_management=ep.url("management"), ts_key_file=Path(args.key_file),
                              host=args.host, admin_host=args.admin_host,
                              port=args.port, admin_port=args.admin_port, grpc_port=args.grpc_port,
                              state_file=Path(args.state_file), key_file=Path(args.router_key_file),
                              processes=process_count(args.processes), drain_s=args.drain_s,
                              limits=limits, routes_file=Path(args.routes_file) if args.routes_file else None,
                              routes_configmap=configmap), _say)
    return 0


def cmd_rollout(args: argparse.Namespace, fleet: Fleet) -> int:
    from tsfleet.control import rollout
    if args.kube:
        from tsfleet.k8s import rollout as rollout_kube
        where = rollout_kube.RoutesConfigMap(args.namespace, args.configmap, args.configmap_key, args.kubectl)
        weight = args.weight if args.action == "start" else args.weight_pos
        rollout_kube.run(where, fleet, args.action, args.model, args.version, weight, _say, Path(args.manifest))
        return 0
    admin = _admin(args)
    if args.action == "status":
        _say(rollout.render_status(admin.routes(), args.model))
        return 0
    if args.action == "rollback":
        route = admin.call("POST", f"/routes/{args.model}/rollback")
        _say(f"{args.model}: all traffic back on {route['baseline']}")
        return 0
    if not args.version:
        raise FleetError(f"rollout {args.action} needs MODEL VERSION")
    if args.action == "promote":
        rollout.promote(admin, _client(args), fleet, args.model, args.version, _say, Path(args.manifest),
                        Path(args.report_dir) if args.report_dir else None)
        return 0
    weight = args.weight if args.action == "start" else args.weight_pos
    if weight is None:
        raise FleetError("set-weight needs MODEL VERSION WEIGHT")
    route = rollout.set_weight(admin, _client(args), args.model, args.version, weight, fleet)
    _say(f"{args.model}: " + ", ".join(f"{v} {w:.0f}%" for v, w in sorted(route["weights"].items())))
    return 0


def cmd_rotate_key(args: argparse.Namespace, fleet: Fleet) -> int:
    doc = _admin(args).call("POST", "/keys/inference", {"grace_s": args.grace_s})
    print(doc["inference"])  # stdout: the key alone, for a script to capture
    until, older = doc["previous_valid_until"], doc.get("older_keys_taken", 0)
    print("the router takes this inference key from now on; the previous one "
          + (f"until {until}" if until else "no longer, nor any older one")
          + (f", and {older} older one(s) until their own grace ends" if older else ""), file=sys.stderr)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Write fleet.yaml's JSON Schema, from its typed models, where editors and CI read it."""
    from tsfleet.manifest import json_schema

    text = json_schema()
    if args.output == "-":
        sys.stdout.write(text)
        return 0
    write_atomically(Path(args.output), text)
    _say(f"wrote {args.output}")
    return 0


def cmd_down(args: argparse.Namespace, fleet: Fleet) -> int:
    from tsfleet.control import up
    server = _server(args)
    ran = server.state() == "running"
    up.stop_all(server)
    _say("TorchServe stopped" if ran else "TorchServe was not running")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tsfleet", description=__doc__)
    parser.add_argument("--manifest", default=str(ROOT / "fleet.yaml"), help="fleet manifest (fleet.yaml)")
    parser.add_argument("--model-store", default=str(ROOT / "model_store"))
    parser.add_argument("--cache", default=str(ROOT / "build" / "artifacts"), help="recipe outputs")
    parser.add_argument("--config", default=str(ROOT / "config.properties"), help="TorchServe config.properties")
    parser.add_argument("--report-dir", default="", help="where workers report to the recycler "
                        "(default <tmp>/tsfleet-workers)")
    parser.add_argument("--router-admin", default="http://127.0.0.1:8091", help="the router's admin API")
    parser.add_argument("--router-key-file", default="router_key.json",
                        help="the router's tokens: admin, and an inference key for clients that does not expire")
    parser.add_argument("--key-file", default="key_file.json",
                        help="TorchServe's key file (written where it was started)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build every .mar/.war the manifest names (skips what is up to date)")
    p = sub.add_parser("config", help="render config.properties from the manifest")
    p.add_argument("--output", default=str(ROOT / "config.properties"))
    p.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    p = sub.add_parser("up", help="build, start TorchServe, wait until every model is ready")
    p.add_argument("--no-build", action="store_true")
    p.add_argument("--detach", action="store_true", help="leave the fleet running and return")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for ready workers")
    p.add_argument("--recycler-port", type=int, default=8083, help="the recycler's Prometheus port")
    p.add_argument("--router-processes", type=_processes_arg, default="auto",
                   help="router processes sharing its ports, or auto (see `route --processes`)")
    p.add_argument("--router-host", default="127.0.0.1",
                   help="address of the router's REST and gRPC ports (see `route --host`)")
    p.add_argument("--router-port", type=int, default=8090, help="the router's REST port (see `route --port`)")
    p.add_argument("--router-grpc-port", type=int, default=7090,
                   help="the router's gRPC port (see `route --grpc-port`)")
    p.add_argument("--router-admin-port", type=int, default=8091,
                   help="the router's admin API, on loopback; other commands reach it with --router-admin")
    sub.add_parser("down", help="stop a running fleet")
    sub.add_parser("plan", help="show what apply would change on the running server")
    sub.add_parser("apply", help="take the running server to the manifest")
    p = sub.add_parser("recycle", help="replace workers past their recycle policy, until stopped")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between looks")
    p.add_argument("--metrics-port", type=int, default=8083, help="Prometheus port (0: none)")
    p.add_argument("--metrics-host", default="127.0.0.1",
                   help="address of the Prometheus port: loopback by default; 0.0.0.0 (or ::) where "
                        "Prometheus scrapes from elsewhere, as in a pod")
    p = sub.add_parser("route", help="run the A/B router in front of TorchServe, until stopped")
    p.add_argument("--host", default="127.0.0.1",
                   help="address of the REST and gRPC listeners; 0.0.0.0 serves other machines (clients, "
                        "a kubelet's probes); the admin API stays on --admin-host")
    p.add_argument("--admin-host", default="127.0.0.1", help="address of the admin API (loopback by default)")
    p.add_argument("--port", type=int, default=8090, help="REST port clients use instead of 8080")
    p.add_argument("--admin-port", type=int, default=8091)
    p.add_argument("--grpc-port", type=int, default=7090, help="gRPC port clients use instead of 7070")
    p.add_argument("--state-file", default="router_state.json")
    p.add_argument("--drain-s", type=float, default=10.0,
                   help="on SIGTERM/Ctrl-C: seconds requests under way may take to be answered")
    p.add_argument("--processes", type=_processes_arg, default="auto",
                   help="processes sharing the router's ports: one proxies on one core, so give it "
                        "more where TorchServe answers faster than one core can pass on; auto (the "
                        "default): one per four usable CPUs, at most four")
    p.add_argument("--routes-file", default="",
                   help="a routes file to follow (a mounted ConfigMap's key; the format of the state file): "
                        "its changes move this router's weights within a second (default: none)")
    p.add_argument("--routes-configmap", default="",
                   help="the ConfigMap that --routes-file is mounted from: in a pod, automatic rollbacks are "
                        "written there for every replica (key: the file's name; default: "
                        "$TSFLEET_ROUTES_CONFIGMAP, else none)")
    p = sub.add_parser("rollout", help="canary, promote or roll back a version through the router")
    p.add_argument("action", choices=["start", "set-weight", "promote", "rollback", "status"])
    p.add_argument("model", nargs="?")
    p.add_argument("version", nargs="?")
    p.add_argument("weight_pos", nargs="?", type=float, metavar="WEIGHT", help="for set-weight")
    p.add_argument("--weight", type=float, default=5.0, help="percent of traffic for start (default 5)")
    p.add_argument("--kube", action="store_true",
                   help="on Kubernetes: write the routes ConfigMap every router replica follows, with kubectl, "
                        "instead of calling one router's admin API")
    p.add_argument("--namespace", default="tsfleet", help="with --kube: the fleet's namespace (default tsfleet)")
    p.add_argument("--configmap", default="tsfleet-routes",
                   help="with --kube: the routes ConfigMap (default tsfleet-routes)")
    p.add_argument("--configmap-key", default="routes.json",
                   help="with --kube: its key, the routers' --routes-file name (default routes.json)")
    p.add_argument("--kubectl", default="kubectl", help="with --kube: the kubectl to run (default: kubectl on PATH)")
    p = sub.add_parser("rotate-key", help="give the router a new inference key (prints it); the old one "
                       "is taken a while longer")
    p.add_argument("--grace-s", type=float, default=3600, help="seconds the old key is still taken (default 3600)")
    p = sub.add_parser("schema", help="write fleet.yaml's JSON Schema (editors show its help and check the file)")
    p.add_argument("-o", "--output", default=str(ROOT / "fleet.schema.json"),
                   help="where to write it (default: fleet.schema.json in the repo); - for stdout")
    p = sub.add_parser("status", help="models, versions and workers on the running server")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    handlers = {"build": cmd_build, "config": cmd_config, "up": cmd_up, "down": cmd_down,
                "plan": cmd_plan, "apply": cmd_apply, "status": cmd_status, "recycle": cmd_recycle,
                "route": cmd_route, "rollout": cmd_rollout, "rotate-key": cmd_rotate_key}
    try:
        if args.command == "schema":  # describes any manifest: reads none
            return cmd_schema(args)
        return handlers[args.command](args, load_fleet(args.manifest))
    except FleetError as exc:
        print(f"tsfleet: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
