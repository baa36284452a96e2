"""tsfleet.k8s.pod, the TorchServe container's entry point: its probe, and its foreground
TorchServe's life (started, watched, stopped with `torchserve --stop` on SIGTERM), with a
stand-in `torchserve` so that no JVM is needed."""
from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tsfleet.k8s import pod
from tests.k8s.rendered import ROOT
from tests.polling import wait_for

pytestmark = pytest.mark.k8s

# What the real `torchserve` does, as far as tsfleet.k8s.pod sees it: `--start --foreground`
# writes the frontend's pid file in the temp dir and key_file.json in the working directory,
# and serves until SIGTERM; `--stop` sends SIGTERM to the pid the file names and removes the
# file. The stand-in is its own frontend; it records what it saw in $STANDIN_LOG.
STANDIN = textwrap.dedent("""\
    #!{python}
    import json, os, signal, sys, tempfile, time
    log = os.environ["STANDIN_LOG"]
    pid_file = os.path.join(tempfile.gettempdir(), ".model_server.pid")
    def note(what):
        with open(log, "a") as fh:
            fh.write(json.dumps(what) + "\\n")
    if "--stop" in sys.argv:
        try:
            pid = int(open(pid_file).read())
            os.kill(pid, signal.SIGTERM)
            note({{"stop": pid}})
        except (OSError, ValueError):
            note({{"stop": None}})
        if os.path.exists(pid_file):
            os.remove(pid_file)
        sys.exit(0)
    note({{"start": sys.argv[1:], "cwd": os.getcwd()}})
    signal.signal(signal.SIGTERM, lambda *a: (note({{"sigterm": os.getpid()}}), sys.exit(0)))
    with open(pid_file, "w") as fh:
        fh.write(str(os.getpid()))
    doc = {{k: {{"key": k + "-key", "expiration time": "2099-01-01T00:00:00"}}
           for k in ("management", "inference", "API")}}
    with open("key_file.json", "w") as fh:
        json.dump(doc, fh)
    while not os.path.exists(os.environ["STANDIN_DIE"]):
        time.sleep(0.02)
    note({{"died": os.getpid()}})
    sys.exit(3)
""")

# tsfleet.k8s.pod.serve with `up.bring_up` cut down to the start (the real one then registers
# workflows and waits for workers through the management API, which the stand-in lacks).
DRIVER = textwrap.dedent("""\
    import sys, time
    from pathlib import Path
    from tsfleet.k8s import pod
    from tsfleet.control import up
    def bring_up(server, fleet, timeout, say):
        server.start()
        server.wait_for_keys(time.monotonic() + 30)

    up.bring_up = bring_up
    root, workdir, exe = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    sys.exit(pod.serve(root / "config.properties", root / "fleet.yaml", workdir / "store", workdir / "ts", 30,
                       print, poll_s=0.02, executable=exe))
""")


@pytest.fixture
def standin(tmp_path: Path):
    exe = tmp_path / "torchserve"
    exe.write_text(STANDIN.format(python=sys.executable))
    exe.chmod(0o755)
    (tmp_path / "tmp").mkdir()
    (tmp_path / "store").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "STANDIN_LOG": str(tmp_path / "log"),
           "STANDIN_DIE": str(tmp_path / "die"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(ROOT), str(tmp_path), str(exe)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    yield proc, tmp_path
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def notes(tmp_path: Path) -> list[dict]:
    path = tmp_path / "log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def frontend_up(tmp_path: Path) -> bool:
    started = any("start" in n for n in notes(tmp_path))
    return (started and (tmp_path / "ts" / "key_file.json").exists()
            and (tmp_path / "tmp" / ".model_server.pid").exists())


def test_sigterm_stops_torchserve_with_its_own_stop_and_exits_0(standin):
    proc, tmp_path = standin
    wait_for("the stand-in frontend to start", lambda: frontend_up(tmp_path), timeout=60)
    start = next(n for n in notes(tmp_path) if "start" in n)
    assert start["start"][:2] == ["--start", "--foreground"] and "--ncs" in start["start"]
    assert start["cwd"] == str(tmp_path / "ts"), "key_file.json lands in --workdir"
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    stopped = [n for n in notes(tmp_path) if "stop" in n]
    assert stopped and stopped[0]["stop"] is not None, "torchserve --stop found the frontend's pid"
    assert any("sigterm" in n for n in notes(tmp_path)), "the frontend got its SIGTERM from --stop"
    assert not (tmp_path / "tmp" / ".model_server.pid").exists()


def test_a_frontend_that_exits_ends_the_container_with_1(standin):
    proc, tmp_path = standin
    wait_for("the stand-in frontend to start", lambda: frontend_up(tmp_path), timeout=60)
    (tmp_path / "die").touch()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "TorchServe exited" in out


class _Answers400(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(400)  # TorchServe's answer to /ping without the key
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def _config(tmp_path: Path, port: int) -> Path:
    config = tmp_path / "config.properties"
    config.write_text(f"inference_address=http://127.0.0.1:{port}\n")
    return config


def test_ping_counts_a_refusal_as_an_answer(tmp_path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers400)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        config = _config(tmp_path, httpd.server_address[1])
        assert pod.ping(config)
        assert pod.main(["ping", "--config", str(config)]) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_ping_fails_where_nothing_listens(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # free once closed
    config = _config(tmp_path, port)
    assert not pod.ping(config)
    assert pod.main(["ping", "--config", str(config)]) == 1


def test_ping_fails_on_a_listener_that_never_answers(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)  # accepted by the kernel, never answered
        assert not pod.ping(_config(tmp_path, s.getsockname()[1]), timeout=0.5)


def test_torchserve_command_keeps_torchserve_unchanged_but_in_the_foreground(tmp_path):
    cmd = pod.torchserve_command("torchserve", tmp_path / "c", tmp_path / "s", tmp_path / "l.xml")
    assert cmd[:3] == ["torchserve", "--start", "--foreground"]
    assert cmd[cmd.index("--model-store") + 1] == cmd[cmd.index("--workflow-store") + 1] == str(tmp_path / "s")
    assert cmd[cmd.index("--log-config") + 1] == str(tmp_path / "l.xml") and "--ncs" in cmd
