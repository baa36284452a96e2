"""The pod's containers run here as the image would run them, without Docker: its entry points
as non-root user 10001 with no capabilities, the application tree (the repo with its venv, at
the image's /opt/tsfleet) and everything else read-only, and only the Deployment's volumes
writable; they start in the sidecar order, serve every model and the workflow through the
router, and a deletion under REST and gRPC load loses no request the router accepted, each
container exiting by itself within terminationGracePeriodSeconds.

Everything comes from the rendered cpu overlay (tests/k8s/rendered.py) and k8s/Dockerfile, so
this breaks when they drift: the containers' commands, args, working directories, env, user
and groups, volumes and mounts (each emptyDir a folder of the test, each ConfigMap its
rendered data, the router's key Secret made as k8s/README.md makes it), the probes the kubelet
would run, the preStop hook and the grace period. Each container is a process of its own in
the pod's network namespace (its loopback is the pod's, so the fixed ports clash with nothing
here) with a mount namespace of its own (tests/k8s/podrun.py), as a container runtime gives;
the image's user is in each container's /etc/passwd as in the image, through a private overlay
(this machine's accounts are not changed). The containers see the machine's processes, as
shareProcessNamespace lets them see each other's.

What this does not check, and why: the image itself (not built here: no Docker daemon; the
application tree is the repo and its venv, not the image's copy); seccomp's RuntimeDefault
profile (no runtime's profile here); the containers' CPU and memory requests and limits and the
volumes' size limits (no cgroups or kubelet eviction are set up); the kubelet's own timing of
probes (they are polled here until they pass, within the periods and thresholds they declare);
anything that needs the Kubernetes API (the router's token is a stand-in) or more time (TorchServe's
key renewal, an hour). It needs root, for the namespaces, the mounts and the switch to user 10001, and skips saying so
without it.
"""
from __future__ import annotations

import base64
import json
import os
import re
import secrets
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import yaml

from tests.k8s.rendered import ROOT, container, containers, one, overlay, pod_spec
from tests.k8s.test_dockerfile import DOCKERFILE, stages
from tests.polling import wait_for
from tsfleet.build.archive import handler_class
from tsfleet.manifest import Fleet, parse_fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.k8s]

OVERLAY = "cpu"  # no GPU here; the gpu overlay differs in resources, node selection and router processes
POD = "tsfleet-pod-run"
# The python image's PATH, which the Dockerfile's ENV PATH=...:$PATH extends.
BASE_IMAGE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
# Filesystems that are the kernel's, not the image's: writable in a container too.
KERNEL_FS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "mqueue", "securityfs", "debugfs",
             "tracefs", "bpf", "fusectl", "configfs", "pstore", "hugetlbfs"}
REST_CLIENTS, GRPC_CLIENTS = 3, 2
WORKFLOW_TEXT = b'{"text": "hello, good evening"}'  # the workflow answers "greeting"
# Answers each front must have given before the pod is deleted: the load is really on.
WARM_ANSWERS = 20


# --- what the image and the Deployment declare -------------------------------------------

@dataclass(frozen=True)
class Image:
    env: dict[str, str]
    workdir: str
    user: str


def image() -> Image:
    """The runtime stage of k8s/Dockerfile: its ENV (ARG defaults and $PATH filled in), last
    WORKDIR and USER."""
    args: dict[str, str] = {"PATH": BASE_IMAGE_PATH}
    env: dict[str, str] = {"PATH": BASE_IMAGE_PATH}
    workdir = user = ""

    def expand(value: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: {**args, **env}.get(m.group(1), ""), value)

    for ins, rest in stages(DOCKERFILE.read_text())[-1]:
        if ins == "ARG":
            name, _, default = rest.partition("=")
            args[name.strip()] = default.strip()
        elif ins == "ENV":
            for pair in shlex.split(rest):
                key, _, value = pair.partition("=")
                env[key] = expand(value)
        elif ins == "WORKDIR":
            workdir = rest.strip()
        elif ins == "USER":
            user = rest.strip()
    return Image(env, workdir, user)


def security(spec: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    """The container's effective security context (its own over the pod's)."""
    return {**spec.get("securityContext", {}), **c.get("securityContext", {})}


def env_of(c: dict[str, Any], objs: list[dict[str, Any]], img: Image) -> dict[str, str]:
    deployment = one(objs, "Deployment")
    fields = {"metadata.namespace": deployment["metadata"]["namespace"], "metadata.name": POD}
    env = {**img.env, "HOSTNAME": POD}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"].get("fieldRef", {}).get("fieldPath")
            assert ref in fields, f"{c['name']}: env {var['name']} comes from {var['valueFrom']}, unknown here"
            env[var["name"]] = fields[ref]
    return env


def port_number(c: dict[str, Any], port: int | str) -> int:
    return port if isinstance(port, int) else next(p["containerPort"] for p in c["ports"] if p["name"] == port)


# --- the pod's volumes, as folders of the test ---------------------------------------------

def make_volumes(spec: dict[str, Any], objs: list[dict[str, Any]], root: Path, fs_group: int,
                 router_keys: dict[str, str]) -> dict[str, Path]:
    """Each volume of the pod as a folder, owned as the kubelet leaves it: emptyDirs writable by
    the fsGroup; ConfigMaps, the Secret and the projected token read-only to it."""
    namespace = one(objs, "Deployment")["metadata"]["namespace"]
    folders = {}
    for volume in spec["volumes"]:
        folder = root / volume["name"]
        folder.mkdir(parents=True)
        if "emptyDir" in volume:
            os.chown(folder, 0, fs_group)
            folder.chmod(0o2770)  # the fsGroup's, set-group-id: what the pod's processes write stays its
        elif "configMap" in volume:
            data = one(objs, "ConfigMap", volume["configMap"]["name"]).get("data") or {}
            items = volume["configMap"].get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                (folder / item["path"]).write_text(data[item["key"]])
                (folder / item["path"]).chmod(volume["configMap"].get("defaultMode", 0o644))
        elif "secret" in volume:
            assert volume["secret"]["secretName"] == "tsfleet-router-key", f"unknown secret {volume}"
            made = folder / "router_key.json"
            made.write_text(json.dumps(router_keys))
            os.chown(made, 0, fs_group)
            made.chmod(volume["secret"].get("defaultMode", 0o644))
        elif "projected" in volume:
            for source in volume["projected"]["sources"]:
                if "serviceAccountToken" in source:
                    files = {source["serviceAccountToken"]["path"]: "a token no API server here takes"}
                elif "configMap" in source:
                    files = {i["path"]: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n"
                             for i in source["configMap"]["items"]}
                elif "downwardAPI" in source:
                    paths = [i["fieldRef"]["fieldPath"] for i in source["downwardAPI"]["items"]]
                    assert paths == ["metadata.namespace"], paths
                    files = {i["path"]: namespace for i in source["downwardAPI"]["items"]}
                else:
                    raise AssertionError(f"unknown projected source {source}")
                for name, text in files.items():
                    (folder / name).write_text(text)
                    os.chown(folder / name, 0, fs_group)
                    (folder / name).chmod(volume["projected"].get("defaultMode", 0o644))
        else:
            raise AssertionError(f"volume {volume['name']}: a kind this test does not make: {volume}")
        folders[volume["name"]] = folder
    return folders


# --- the containers ------------------------------------------------------------------------

@dataclass
class Container:
    name: str
    spec: dict[str, Any]  # podrun's spec
    decl: dict[str, Any]  # the Deployment's container
    proc: subprocess.Popen | None = None
    log: Path | None = None
    exit_code: int | None = None


def container_spec(c: dict[str, Any], pod: dict[str, Any], objs: list[dict[str, Any]], img: Image,
                   volumes: dict[str, Path], work: Path, netns: str, command: list[str] | None = None,
                   report: str = "") -> dict[str, Any]:
    sec = security(pod, c)
    assert sec.get("runAsNonRoot") and sec.get("runAsUser", 0) != 0, f"{c['name']}: not declared non-root"
    assert sec.get("readOnlyRootFilesystem"), f"{c['name']}: its root filesystem is not declared read-only"
    assert sec.get("allowPrivilegeEscalation") is False and sec.get("capabilities", {}).get("drop") == ["ALL"]
    uid, gid = sec["runAsUser"], sec.get("runAsGroup", sec["runAsUser"])
    groups = sorted({gid, *([pod["securityContext"]["fsGroup"]] if "fsGroup" in pod.get("securityContext", {}) else []),
                     *pod.get("securityContext", {}).get("supplementalGroups", [])})
    binds, writable = [], []
    for m in c.get("volumeMounts", []):
        source = volumes[m["name"]] / m.get("subPath", "")
        binds.append({"source": str(source), "target": m["mountPath"], "read_only": bool(m.get("readOnly")),
                      "is_dir": source.is_dir()})
        if not m.get("readOnly") and source.is_dir():
            writable.append(m["mountPath"])
    # A container runtime gives every container a private /dev/shm (64 MiB) unless a volume is there.
    tmpfs = [] if any(m["mountPath"] == "/dev/shm" for m in c.get("volumeMounts", [])) else \
        [{"target": "/dev/shm", "size": "64m"}]
    scratch = work / "scratch" / f"{c['name']}-{len(list((work / 'scratch').glob(c['name'] + '-*')))}"
    scratch.mkdir(parents=True)
    return {
        "netns": netns, "scratch": str(scratch), "report": report or str(work / "reports" / f"{c['name']}.json"),
        "app_source": str(ROOT), "app_target": img.workdir, "app_also_at": str(ROOT),
        "binds": binds, "tmpfs": tmpfs, "writable": writable,
        # Where nothing may be written: the image's tree, the venv, the repo the venv points
        # at, the root and the other folders of the root filesystem.
        "probe_writes": ["/", img.workdir, f"{img.workdir}/.venv/lib", f"{img.workdir}/model_store", str(ROOT),
                         "/etc", "/var/tmp", "/usr", os.path.realpath(sys.base_prefix)],
        "reachable": [os.path.realpath(sys.base_prefix)],
        "user": {"name": "tsfleet", "uid": uid, "gid": gid, "groups": groups, "home": "/tmp"},
        "cwd": c.get("workingDir", img.workdir),
        # The image installs the project in editable mode at its WORKDIR, so `tsfleet` imports
        # from there. This venv was installed at ROOT, which may lie under the pod's own /tmp
        # (a clone in /tmp: hidden by the pod's emptyDir), so the image's import path is given.
        "env": {**env_of(c, objs, img), "PYTHONPATH": img.workdir},
        "command": command or [*c.get("command", []), *c.get("args", [])],
    }


def launch(spec: dict[str, Any], path: Path, log: Path | None) -> subprocess.Popen:
    path.write_text(json.dumps(spec))
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "tests.k8s.podrun", "container", str(path)], cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, env={"PATH": os.environ.get("PATH", "")})
    finally:
        if log:
            out.close()


def tail(path: Path | None, lines: int = 40) -> str:
    if path is None or not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class Client:
    """The pod's clients (tests/k8s/podrun.py `client`), inside its network namespace."""

    def __init__(self, netns: str):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.k8s.podrun", "client", netns], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})

    def ask(self, wait_s: float = 90, **cmd: Any) -> dict[str, Any]:
        """One command's answer; ``wait_s`` bounds the wait (each command has its own timeouts)."""
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], wait_s)
        assert ready, f"the pod's client did not answer {cmd['op']} within {wait_s:.0f} s"
        line = self.proc.stdout.readline()
        assert line, f"the pod's client exited (code {self.proc.poll()})"
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def pod_processes(uid: int) -> list[psutil.Process]:
    """Every process running as the pod's user: only the pod's, on a machine with no such user."""
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"] and proc.info["uids"].real == uid:
                found.append(proc)
        except psutil.Error:
            continue
    return found


@dataclass
class Pod:
    objs: list[dict[str, Any]]
    spec: dict[str, Any]
    img: Image
    work: Path
    volumes: dict[str, Path]
    netns_holder: subprocess.Popen
    client: Client
    router_keys: dict[str, str]
    uid: int
    fleet: Fleet
    containers: dict[str, Container] = field(default_factory=dict)
    started: float = 0.0
    # The router's startup probe's answer the moment it passed, and each workflow's status for
    # a request sent right after it (the kubelet then adds the pod to its Services' endpoints).
    startup_answer: dict[str, Any] = field(default_factory=dict)
    first_workflow_answers: dict[str, int | None] = field(default_factory=dict)

    @property
    def netns(self) -> str:
        return f"/proc/{self.netns_holder.pid}/ns/net"

    def spec_for(self, name: str, command: list[str] | None = None, report: str = "") -> dict[str, Any]:
        return container_spec(container(self.spec, name), self.spec, self.objs, self.img, self.volumes, self.work,
                              self.netns, command, report)

    def start(self, name: str) -> Container:
        spec = self.spec_for(name)
        box = Container(name, spec, container(self.spec, name), log=self.work / "logs" / f"{name}.log")
        box.proc = launch(spec, self.work / "specs" / f"{name}.json", box.log)
        self.containers[name] = box
        return box

    def exec_in(self, name: str, command: list[str], timeout: float) -> int:
        """`kubectl exec`, or an exec probe: ``command`` in a fresh copy of the container's namespaces."""
        report = str(self.work / "reports" / f"{name}-exec.json")
        proc = launch(self.spec_for(name, command, report), self.work / "specs" / f"{name}-exec.json",
                      self.work / "logs" / f"{name}-exec.log")
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -1

    def http(self, port: int, path: str, method: str = "GET", body: bytes | None = None,
             headers: dict[str, str] | None = None, timeout: float = 10) -> dict[str, Any]:
        return self.client.ask(op="http", port=port, path=path, method=method, headers=headers or {},
                               body=base64.b64encode(body).decode() if body else None, timeout=timeout)

    def probe_ok(self, name: str, probe: dict[str, Any]) -> bool:
        """One try of a probe as the kubelet runs it: exec in the container, or an HTTP GET of
        the pod's address (here, its loopback) that answers 200 to 399."""
        c = container(self.spec, name)
        if "exec" in probe:
            return self.exec_in(name, probe["exec"]["command"], probe.get("timeoutSeconds", 1)) == 0
        get = probe["httpGet"]
        answer = self.http(port_number(c, get["port"]), get["path"], timeout=probe.get("timeoutSeconds", 1))
        status = answer.get("status")
        return status is not None and 200 <= status < 400

    def wait_started(self, name: str) -> None:
        """Until the container's startup probe passes, within what the probe allows."""
        c = container(self.spec, name)
        probe = c.get("startupProbe")
        if probe is None:
            assert self.containers[name].proc.poll() is None, f"{name} exited:\n{tail(self.containers[name].log)}"
            return
        allowed = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)

        def started() -> bool:
            for box in self.containers.values():
                assert box.proc.poll() is None, f"{box.name} exited ({box.proc.returncode}):\n{tail(box.log)}"
            return self.probe_ok(name, probe)

        wait_for(f"{name}'s startup probe", started, timeout=allowed, interval=0.5)

    def key_headers(self, content_type: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.router_keys['inference']}", "Content-Type": content_type}

    def stop_all(self) -> None:
        """What a failed test leaves: every container, and every process of the pod's user."""
        for box in self.containers.values():
            if box.proc and box.proc.poll() is None:
                box.proc.kill()
                box.proc.wait()
        for proc in pod_processes(self.uid):
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(pod_processes(self.uid), timeout=30)


def samples(served: Fleet) -> dict[str, tuple[str, bytes]]:
    """Each model's handler sample request (content type, body), as `tsfleet up` warms it."""
    out = {}
    for name, model in served.models.items():
        cls = handler_class(model.versions[model.default_version].handler)
        sample = cls.sample_request() if cls and hasattr(cls, "sample_request") else None
        assert sample, f"{name}'s handler has no sample request"
        out[name] = sample
    return out


def _available() -> str | None:
    """Why this machine cannot run the pod this way, or None."""
    if os.geteuid() != 0:
        return "needs root: mount and network namespaces, bind mounts and the switch to the image's user 10001"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (util-linux, iproute2)"
    done = subprocess.run(["unshare", "--mount", "--net", "true"], capture_output=True, text=True)
    if done.returncode != 0:
        return f"mount and network namespaces are refused here: {done.stderr.strip()}"
    return None


@pytest.fixture(scope="module")
def pod(model_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pod]:
    """The pod, started; ``model_store`` (tests/fleet_fixtures.py) builds the archives where missing."""
    why = _available()
    if why:
        pytest.skip(why)
    objs = overlay(OVERLAY)
    spec = pod_spec(objs)
    img = image()
    uid, gid = (int(x) for x in img.user.split(":"))
    sec = spec["securityContext"]
    assert (sec["runAsUser"], sec["runAsGroup"]) == (uid, gid), "the pod runs as the image's user"
    assert not pod_processes(uid), f"processes of uid {uid} already run here: this test could not tell them apart"
    work = tmp_path_factory.mktemp("pod")
    for sub in ("specs", "logs", "reports", "scratch"):
        (work / sub).mkdir()
    keys = {"admin": secrets.token_urlsafe(24), "inference": secrets.token_urlsafe(24)}
    volumes = make_volumes(spec, objs, work / "volumes", sec["fsGroup"], keys)
    fleet_data = one(objs, "ConfigMap", next(v["configMap"]["name"] for v in spec["volumes"]
                                             if v["name"] == "fleet"))["data"]["fleet.yaml"]
    served = parse_fleet(yaml.safe_load(fleet_data), ROOT)
    # The pod's network namespace, held as the pause container holds it.
    holder = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", "ip link set lo up && exec cat"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    wait_for("the pod's network namespace", lambda: Path(f"/proc/{holder.pid}/ns/net").exists()
             and os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"), timeout=10)
    pod = Pod(objs, spec, img, work, volumes, holder, Client(f"/proc/{holder.pid}/ns/net"), keys, uid, served)
    try:
        pod.started = time.monotonic()
        # Native sidecars in their order, each started (its startup probe passed) before the
        # next; then the main container, started when every model has a ready worker.
        for c in containers(spec):
            pod.start(c["name"])
            pod.wait_started(c["name"])
        router = container(spec, "router")
        probe = router["startupProbe"]["httpGet"]
        pod.startup_answer = pod.http(port_number(router, probe["port"]), probe["path"])
        rest = port_number(router, "http")
        pod.first_workflow_answers = {
            flow: pod.http(rest, f"/wfpredict/{flow}", "POST", WORKFLOW_TEXT, pod.key_headers("application/json"),
                           timeout=60)["status"] for flow in served.workflows}
        yield pod
    finally:
        pod.stop_all()
        pod.client.close()
        holder.stdin.close()
        holder.wait(timeout=30)


# --- the tests ------------------------------------------------------------------------------

def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def test_every_process_of_the_pod_runs_as_its_user_without_privileges(pod: Pod):
    """TorchServe's frontend and workers included: uid and gid 10001, the fsGroup as the only
    extra group, no capability in any set, and no way to gain one (no_new_privs)."""
    processes = pod_processes(pod.uid)
    names = " ".join(p.name() for p in processes)
    assert len(processes) >= 3 + len(pod.fleet.versions()), f"expected the three containers and the workers: {names}"
    assert "java" in names, "TorchServe's frontend runs as the pod's user"
    for proc in processes:
        status = proc_status(proc.pid)
        assert status["Uid"].split() == [str(pod.uid)] * 4 and status["Gid"].split() == [str(pod.uid)] * 4, status
        assert status["Groups"].split() == [str(pod.spec["securityContext"]["fsGroup"])], status["Groups"]
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, f"{proc.name()} {proc.pid}: {caps} {status[caps]}"
        assert status["NoNewPrivs"] == "1", proc.name()


@pytest.mark.parametrize("name", ["torchserve", "recycler", "router"])
def test_only_the_declared_volumes_are_writable(pod: Pod, name: str):
    """In each container the root filesystem, the application tree and the venv refuse a
    write even from root (EROFS); the declared writable mounts take one from the user; and
    every writable mount it sees is a declared volume or the kernel's."""
    report = json.loads((pod.work / "reports" / f"{name}.json").read_text())
    assert set(report["refused_as_root"].values()) == {"EROFS"}, report["refused_as_root"]
    assert set(report["refused_as_user"].values()) <= {"EROFS", "EACCES"}, report["refused_as_user"]
    declared = [m["mountPath"] for m in container(pod.spec, name).get("volumeMounts", []) if not m.get("readOnly")]
    assert report["writable_as_user"] and set(report["writable_as_user"].values()) == {"written"}, \
        report["writable_as_user"]
    assert set(report["writable_as_user"]) <= set(declared)
    for m in report["mounts"]:
        if "rw" not in m["options"] or m["fstype"] in KERNEL_FS:
            continue
        assert m["target"] in declared or m["target"] == "/dev/shm", \
            f"{name}: {m['target']} ({m['fstype']}) is writable"


def test_probes_pass_as_the_kubelet_runs_them(pod: Pod):
    for c in containers(pod.spec):
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            if kind in c:
                assert pod.probe_ok(c["name"], c[kind]), f"{c['name']}'s {kind} fails"


def serving(pod: Pod, port: int, path: str, content_type: str, body: bytes) -> dict[str, Any]:
    """The first 200 for ``path``, within the router's startup allowance (a workflow may be
    registered after the pod counts as started: test_the_startup_probe_waits_for_every_workflow)."""
    router = container(pod.spec, "router")
    allowed = router["startupProbe"]["periodSeconds"] * router["startupProbe"]["failureThreshold"]
    answers: list[dict[str, Any]] = []

    def ok() -> bool:
        answers.append(pod.http(port, path, "POST", body, pod.key_headers(content_type), timeout=60))
        return answers[-1]["status"] == 200

    wait_for(f"{path} to be answered", ok, timeout=allowed, interval=0.5)
    return answers[-1]


def test_the_startup_probe_waits_for_every_workflow(pod: Pod):
    """What the kubelet waits for before the pod takes traffic covers everything it serves."""
    assert pod.startup_answer.get("status") == 200, pod.startup_answer
    missing = [flow for flow in pod.fleet.workflows if flow not in pod.startup_answer["body"]]
    assert not missing, (f"the startup probe passed without asking about {missing} "
                         f"({pod.startup_answer['body']}); a request right after it: {pod.first_workflow_answers}")


def test_every_model_version_and_the_workflow_answer_through_the_router(pod: Pod):
    router = container(pod.spec, "router")
    rest, grpc_port = port_number(router, "http"), port_number(router, "grpc")
    for name, (content_type, body) in samples(pod.fleet).items():
        for version in ["", *pod.fleet.models[name].versions]:
            path = f"/predictions/{name}" + (f"/{version}" if version else "")
            answer = pod.http(rest, path, "POST", body, pod.key_headers(content_type), timeout=60)
            assert answer["status"] == 200, f"{path}: {answer}"
            assert json.loads(answer["body"]), path
        answer = pod.client.ask(op="grpc", port=grpc_port, model=name, body=base64.b64encode(body).decode(),
                                key=pod.router_keys["inference"])
        assert answer["code"] == "OK" and json.loads(answer["prediction"]), f"gRPC {name}: {answer}"
    travel = pod.http(rest, "/predictions/intent-classifier", "POST", b'{"text": "book me a flight to Rome"}',
                      pod.key_headers("application/json"), timeout=60)
    assert json.loads(travel["body"])["intent"] == "travel", travel
    for flow in pod.fleet.workflows:
        answer = serving(pod, rest, f"/wfpredict/{flow}", "application/json", WORKFLOW_TEXT)
        assert json.loads(answer["body"])["intent"] == "greeting", answer
    refused = pod.http(rest, "/predictions/intent-classifier", "POST", b'{"text": "hi"}',
                       {"Content-Type": "application/json"}, timeout=30)
    assert refused["status"] in (400, 401, 403), f"no key, no answer: {refused}"


def owned_by(uid: int, top: Path, skip: set[Path]) -> list[str]:
    """Paths under ``top`` owned by ``uid``, not descending into ``skip`` or other filesystems."""
    found, device = [], top.stat().st_dev
    stack = [top]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            path = Path(entry.path)
            if path in skip:
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if st.st_uid == uid:
                found.append(entry.path)
            if entry.is_dir(follow_symlinks=False) and st.st_dev == device:
                stack.append(path)
    return found


def test_deleting_the_pod_under_load_loses_no_accepted_request(pod: Pod):
    """The kubelet's order: the router's preStop, then SIGTERM to the router (the main
    container), and once it has exited the sidecars in reverse order: the recycler, then
    TorchServe, all within terminationGracePeriodSeconds. REST and gRPC clients send requests
    in a closed loop throughout; every request the router took is answered 200, and a client
    meets only a refused connection (or a keep-alive connection closed before it was read)
    once the router stops listening."""
    grace = pod.spec["terminationGracePeriodSeconds"]
    router = container(pod.spec, "router")
    rest, grpc_port = port_number(router, "http"), port_number(router, "grpc")
    payloads = samples(pod.fleet)
    load = {"op": "load", "rest_clients": REST_CLIENTS, "grpc_clients": GRPC_CLIENTS, "rest_port": rest,
            "grpc_port": grpc_port, "key": pod.router_keys["inference"],
            "rest": [{"path": f"/predictions/{m}", "content_type": ct, "body": base64.b64encode(b).decode()}
                     for m, (ct, b) in payloads.items()]
            + [{"path": f"/wfpredict/{w}", "content_type": "application/json",
                "body": base64.b64encode(WORKFLOW_TEXT).decode()} for w in pod.fleet.workflows],
            "grpc": [{"model": m, "body": base64.b64encode(b).decode()} for m, (_, b) in payloads.items()]}
    # The load starts once the pod answers each of its targets (test_the_startup_probe_waits_for_every_workflow).
    for target in load["rest"]:
        serving(pod, rest, target["path"], target["content_type"], base64.b64decode(target["body"]))
    assert pod.client.ask(**load)["started"]

    def warm() -> bool:
        answer = pod.client.ask(op="load_counts")
        counts = answer["counts"]
        assert not answer["failures"], f"requests failed before the pod was deleted: {counts} {answer['failures']}"
        return counts.get("rest ok", 0) >= WARM_ANSWERS and counts.get("grpc ok", 0) >= WARM_ANSWERS

    wait_for("the load to be answered", warm, timeout=90, interval=0.2)

    deleted = time.monotonic()
    pre_stop = router["lifecycle"]["preStop"]["exec"]["command"]
    assert pod.exec_in("router", pre_stop, timeout=grace) == 0, "the router's preStop hook failed"
    signalled = time.monotonic()
    order = ["router", *[c["name"] for c in reversed(pod.spec["initContainers"])
                         if c.get("restartPolicy") == "Always"]]
    assert order == ["router", "recycler", "torchserve"]
    exited: dict[str, float] = {}
    for name in order:
        box = pod.containers[name]
        box.proc.send_signal(signal.SIGTERM)
        left = deleted + grace - time.monotonic()
        try:
            box.exit_code = box.proc.wait(timeout=max(left, 0.1))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} did not exit within the {grace} s grace period:\n{tail(box.log)}")
        exited[name] = time.monotonic() - deleted
        if name == "router":  # its clients are done: the rest stop in their order after
            records = pod.client.ask(wait_s=60, op="load_finish", timeout=30)["records"]
    assert {n: b.exit_code for n, b in pod.containers.items()} == {n: 0 for n in order}, \
        "\n".join(f"{n}: {tail(b.log, 15)}" for n, b in pod.containers.items())
    assert max(exited.values()) <= grace, exited
    wait_for("the pod's last processes to end", lambda: not pod_processes(pod.uid), timeout=max(
        1.0, deleted + grace - time.monotonic()))

    outcomes: dict[str, int] = {}
    for r in records:
        outcomes[f"{r['front']} {r['outcome']}"] = outcomes.get(f"{r['front']} {r['outcome']}", 0) + 1
    print(f"deleted under load: {outcomes}; exited (s after deletion): "
          + ", ".join(f"{n} {t:.1f}" for n, t in exited.items()) + f"; grace {grace} s")
    before = [r for r in records if r["start"] < signalled]
    after = [r for r in records if r["start"] >= signalled]
    assert [r for r in before if r["outcome"] != "ok"] == [], "a request failed before the router's SIGTERM"
    not_taken = {"refused", "closed unanswered"}
    lost = [r for r in after if r["outcome"] not in {"ok"} | not_taken]
    assert not lost, f"{len(lost)} requests the router took were not answered: {lost[:5]}"
    # The drain was exercised: requests under way at SIGTERM were answered, on both fronts;
    # and requests sent during the preStop wait were served.
    for front in ("rest", "grpc"):
        spanning = [r for r in records if r["front"] == front and r["start"] < signalled < r["end"]]
        assert spanning and all(r["outcome"] == "ok" for r in spanning), (front, spanning[:5])
        assert any(r["front"] == front and deleted <= r["start"] < signalled and r["outcome"] == "ok" for r in records)
        assert any(r["front"] == front and r["outcome"] == "refused" for r in after), \
            f"the {front} clients never found the router gone: the load stopped early"

    # Nothing was written outside the volumes: the pod's user owns nothing in the application
    # tree, the venv, the interpreter or the machine's temp folders (but in pytest's own, which
    # hold this and earlier runs' volumes).
    skip = {pod.work.parent, *Path("/tmp").glob("pytest-of-*")}
    strays = []
    for top in (ROOT, Path(os.path.realpath(sys.base_prefix)), Path("/tmp"), Path("/var/tmp"), Path("/dev/shm")):
        strays += owned_by(pod.uid, top, skip)
    assert not strays, f"written outside the pod's volumes: {strays[:20]}"
