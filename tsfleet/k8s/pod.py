"""What the TorchServe container of a Kubernetes pod runs (k8s/): ``python -m tsfleet.k8s.pod``.

On one machine ``tsfleet up`` starts TorchServe, the router and the recycler and restarts
whichever exits. In a pod the kubelet does that, one container each (k8s/README.md says
why the containers are ordered as they are). The router and the recycler run as on one
machine (``tsfleet route``, ``tsfleet recycle``); TorchServe needs this module:

- ``torchserve``: TorchServe in the foreground with its output on the container's stdout,
  taken to the manifest as ``tsfleet up`` does (workflows registered, every version's
  workers ready, the serving path warmed up). It exits when TorchServe's frontend does, so
  the kubelet starts the container again; on SIGTERM it stops TorchServe with TorchServe's
  own ``torchserve --stop`` and waits for the frontend to exit. ``torchserve --foreground``
  alone would not: its wrapper dies of SIGTERM and leaves the frontend to be killed.
- ``ping``: exit 0 when TorchServe's inference listener answers HTTP at all. A kubelet's
  own probes cannot reach it: config.properties binds it to loopback, and its /ping wants a
  key that changes at every start (a refusal without the key is still an answer).

Paths come from the command line and the environment (TMPDIR, TEMP, LOG_LOCATION through
``TorchServe``), so a read-only image writes only to the pod's volumes.
"""
from __future__ import annotations

import argparse
import http.client
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from tsfleet.build.properties import Endpoints

PING_TIMEOUT_S = 5.0
# Loopback calls must never go through an HTTP proxy from the pod's environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def ping(config: Path, timeout: float = PING_TIMEOUT_S) -> bool:
    """Whether TorchServe's inference listener (as ``config`` sets it) answers HTTP: any
    status counts, a 400 for the missing key included; a refused connection or silence does not."""
    url = Endpoints.from_properties(config).url("inference") + "/ping"
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            resp.read()
        return True
    except urllib.error.HTTPError:
        return True  # an answer: the frontend is alive
    except (urllib.error.URLError, OSError, http.client.HTTPException):
        return False  # refused, reset, silent past the timeout, or not HTTP


def torchserve_command(executable: str, config: Path, model_store: Path, log_config: Path) -> list[str]:
    """TorchServe in the foreground, as ``TorchServe.start`` starts it but for ``--ncs``: the
    pod's configuration is its ConfigMap, so snapshots of it are only files to fill the log volume."""
    return [executable, "--start", "--foreground", "--ts-config", str(config), "--model-store", str(model_store),
            "--workflow-store", str(model_store), "--log-config", str(log_config), "--ncs"]


def torchserve_executable() -> str:
    """The `torchserve` beside this interpreter (the image's venv), else the one on PATH."""
    exe = Path(sys.executable).with_name("torchserve")
    return str(exe) if exe.exists() else "torchserve"


def _foreground_server(executable: str):
    """A ``TorchServe`` whose start runs the frontend as a child of this process, its output
    on ours (the container's log) instead of logs/torchserve.out."""
    from tsfleet.build.properties import LOG_CONFIG
    from tsfleet.control.server import KEY_FILE, TorchServe

    class ForegroundTorchServe(TorchServe):
        proc: subprocess.Popen | None = None

        def start(self, snapshots: bool = True) -> None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            (self.workdir / KEY_FILE).unlink(missing_ok=True)  # a dead frontend's keys
            cmd = torchserve_command(executable, self.config, self.model_store, LOG_CONFIG)
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=self.env)
            self._keys = None

        def _torchserve(self, *args: str) -> subprocess.CompletedProcess:
            # `torchserve --stop`, from the same installation as the start.
            return subprocess.run([executable, *args], cwd=self.workdir, env=self.env, capture_output=True,
                                  text=True, timeout=120)

        def state(self) -> str:
            # The wrapper gone (a bad config, the frontend exited) is a death even where it
            # wrote no pid file for ``TorchServe.state`` to find.
            if self.proc is not None and self.proc.poll() is not None:
                return "died"
            return super().state()

    return ForegroundTorchServe


def serve(config: Path, manifest: Path, model_store: Path, workdir: Path, timeout: float,
          say: Callable[[str], None], poll_s: float = 1.0, executable: str | None = None) -> int:
    """Run TorchServe until SIGTERM (0) or until it exits by itself (1)."""
    from tsfleet.control import up
    from tsfleet.errors import FleetError
    from tsfleet.manifest import load_fleet

    server = _foreground_server(executable or torchserve_executable())(
        workdir, config, model_store, Endpoints.from_properties(config))
    signal.signal(signal.SIGTERM, up.interrupt)  # SIGTERM raises KeyboardInterrupt, as Ctrl-C does
    code = 1
    try:
        up.bring_up(server, load_fleet(manifest), timeout, say)
        say("TorchServe is serving the fleet")
        while server.state() == "running":
            time.sleep(poll_s)  # watching for as long as it runs, no deadline
        say(f"TorchServe exited (code {server.proc.returncode if server.proc else '?'}); the kubelet starts "
            "this container again")
    except KeyboardInterrupt:
        say("SIGTERM: stopping TorchServe")
        code = 0
    except FleetError as exc:
        say(f"TorchServe could not be brought up: {exc}")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the stop short
        server.stop()
        if server.proc is not None:
            try:
                server.proc.wait(timeout=10)  # the wrapper exits as soon as the frontend has
            except subprocess.TimeoutExpired:
                server.proc.kill()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tsfleet.k8s.pod", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("torchserve", help="TorchServe in the foreground, brought to the manifest")
    p.add_argument("--config", required=True, type=Path, help="config.properties")
    p.add_argument("--manifest", required=True, type=Path, help="fleet.yaml")
    p.add_argument("--model-store", required=True, type=Path)
    p.add_argument("--workdir", type=Path, default=Path.cwd(),
                   help="where TorchServe writes key_file.json; its logs go to logs/ inside it")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for ready workers")
    p = sub.add_parser("ping", help="exit 0 when TorchServe's inference listener answers")
    p.add_argument("--config", required=True, type=Path, help="config.properties")
    p.add_argument("--timeout", type=float, default=PING_TIMEOUT_S)
    args = parser.parse_args(argv)
    if args.command == "ping":
        return 0 if ping(args.config, args.timeout) else 1

    def say(line: str) -> None:
        print(line, flush=True)

    return serve(args.config, args.manifest, args.model_store, args.workdir.resolve(), args.timeout, say)


if __name__ == "__main__":
    sys.exit(main())
