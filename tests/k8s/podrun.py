"""What tests/k8s/test_pod_run.py needs to run the pod's containers on this machine as a
container runtime would, without one: run as root, each part in a process of its own.

``python -m tests.k8s.podrun container SPEC.json`` is one container: it joins the pod's
network namespace, makes a mount namespace of its own in which the root filesystem is
read-only and only the container's volumes are mounted writable (the image's /opt/tsfleet is
the repo with its venv, read-only), drops to the pod's user with no capabilities and no way
to gain privileges, and execs the container's command. Before the exec it writes a report
(the mounts it sees, which writes it was refused) to the report file the spec names.

``python -m tests.k8s.podrun client NETNS`` is whoever talks to the pod: it joins the pod's
network namespace (where the pod's loopback is its own, so the pod's fixed ports clash with
nothing on this machine) and answers JSON commands read from stdin (HTTP and gRPC calls,
a closed-loop load), one JSON line each on stdout.

Only the standard library is imported before the namespaces are entered; the client imports
grpc and the project's stubs after.
"""
from __future__ import annotations

import base64
import ctypes
import errno
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24
O_PATH = 0o10000000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def setns(path: str, nstype: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        _check(_libc.setns(fd, nstype), f"setns {path}")
    finally:
        os.close(fd)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: s.encode() if s is not None else None)
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source} on {target} ({fstype or 'bind'}, flags {flags:#x})")


def read_only(target: str) -> None:
    """Make the mount at ``target`` read-only in this namespace alone (a per-mount flag: the
    filesystem under it, and every other namespace's view of it, stay as they are)."""
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _nearest_existing(path: str) -> str:
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return os.path.realpath(path)


class Rootfs:
    """Builds one container's view of the filesystem in the current mount namespace."""

    def __init__(self, scratch: str):
        # Private: nothing mounted here reaches the machine's namespace, and the reverse.
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        mount("tsfleet-scratch", scratch, "tmpfs", MS_NOSUID | MS_NODEV, "size=16m,mode=700")
        # Reached through this descriptor from now on: a volume mounted over /tmp would hide
        # the path (and a path would then lead into the volume).
        self.scratch_fd = os.open(scratch, O_PATH | os.O_CLOEXEC)
        self.scratch = f"/proc/self/fd/{self.scratch_fd}"
        self.layered: list[str] = []
        self.read_only: list[str] = ["/"]
        self.volumes: list[str] = []  # writable volume mounts: a mount point inside one is made in it

    def layer(self, folder: str) -> None:
        """An overlay over ``folder`` whose changes (the mount points the runtime makes, the
        image's user in /etc/passwd) land in a private tmpfs, never on the machine's disk."""
        if folder in self.layered:
            return
        assert folder != "/", "a mount point directly under / cannot be layered"
        n = len(self.layered)
        upper, work = f"{self.scratch}/{n}/upper", f"{self.scratch}/{n}/work"
        os.makedirs(upper)
        os.makedirs(work)
        mount("overlay", folder, "overlay", 0, f"lowerdir={folder},upperdir={upper},workdir={work}")
        self.layered.append(folder)
        self.read_only.append(folder)

    def mount_point(self, target: str, is_dir: bool) -> None:
        """``target``, made where the image lacks it, as a container runtime makes it."""
        if os.path.lexists(target):
            return
        parent = _nearest_existing(os.path.dirname(target))
        # Inside a writable volume or a layer already made, the folder is made there: a new
        # layer over it would hide what is already mounted inside it.
        if not any(parent == f or parent.startswith(f.rstrip("/") + "/") for f in self.volumes + self.layered):
            self.layer(parent)
        if is_dir:
            # exist_ok: as a runtime's mkdir -p (a full suite's run once found the folder made
            # between the check above and here)
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            Path(target).touch()

    def bind(self, source_fd: int, target: str, read_only_: bool, is_dir: bool = True) -> None:
        self.mount_point(target, is_dir)
        mount(f"/proc/self/fd/{source_fd}", target, None, MS_BIND | MS_REC)
        if read_only_:
            read_only(target)
        elif is_dir:
            self.volumes.append(target)

    def tmpfs(self, target: str, size: str) -> None:
        self.mount_point(target, True)
        mount("tsfleet-tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, f"size={size},mode=1777")

    def reachable(self, path: str, uid: int, gids: set[int]) -> None:
        """Let ``uid`` reach ``path`` (the interpreter's installation) where a folder above it
        is closed to others: a tmpfs over that folder holds only ``path``'s branch of it."""
        parts = Path(path).parts
        for depth in range(2, len(parts)):
            folder = str(Path(*parts[:depth]))
            st = os.stat(folder)
            if st.st_mode & 0o001 or (st.st_uid == uid and st.st_mode & 0o100) or \
                    (st.st_gid in gids and st.st_mode & 0o010):
                continue
            branch = str(Path(*parts[:depth + 1]))
            fd = os.open(branch, O_PATH)
            mount("tsfleet-reach", folder, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
            os.makedirs(branch)
            mount(f"/proc/self/fd/{fd}", branch, None, MS_BIND | MS_REC)
            os.close(fd)
            self.read_only += [branch, folder]
            return

    def finish(self) -> None:
        """Everything but the volumes read-only, /sys too as a runtime mounts it for a
        container that is not privileged; the scratch tmpfs (the overlays' upper layers) out
        of sight."""
        sys_mounts = [m["target"] for m in mounts_seen() if m["target"] == "/sys" or m["target"].startswith("/sys/")]
        for target in reversed(self.read_only + sys_mounts):
            read_only(target)
        read_only(self.scratch)
        _check(_libc.umount2(self.scratch.encode(), MNT_DETACH), "umount the scratch tmpfs")
        os.close(self.scratch_fd)


def mounts_seen() -> list[dict[str, Any]]:
    """This process's mount table: target, filesystem type and whether it is writable."""
    seen = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        sep = fields.index("-")
        seen.append({"target": fields[4].replace("\\040", " "), "options": fields[5].split(","),
                     "fstype": fields[sep + 1], "source": fields[sep + 2]})
    return seen


def refused_writes(paths: list[str]) -> dict[str, str]:
    """For each folder, what creating a file in it gave: the errno's name, or "written"."""
    out = {}
    for folder in paths:
        probe = os.path.join(folder, f".podrun-probe-{os.getpid()}")
        try:
            fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except OSError as exc:
            out[folder] = errno.errorcode.get(exc.errno, str(exc.errno))
            continue
        os.close(fd)
        os.unlink(probe)
        out[folder] = "written"
    return out


def drop_privileges(uid: int, gid: int, groups: list[int]) -> None:
    """runAsUser/runAsGroup/fsGroup, capabilities drop ALL, allowPrivilegeEscalation false."""
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):
        _check(_libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap}")
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    os.setgroups(groups)
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)  # from root to another uid: the permitted capabilities go too


def run_container(spec: dict[str, Any]) -> None:
    """Enter the pod, build the container's filesystem, become its user, exec its command."""
    report = os.open(spec["report"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    setns(spec["netns"], CLONE_NEWNET)
    _check(_libc.unshare(CLONE_NEWNS), "unshare the mount namespace")
    # Every source opened before the first mount (mounting /tmp hides the machine's /tmp,
    # where they may live) and after the unshare (a bind takes its source from this namespace).
    sources = {m["target"]: os.open(m["source"], O_PATH | os.O_CLOEXEC) for m in spec["binds"]}
    app_fd = os.open(spec["app_source"], O_PATH | os.O_CLOEXEC)
    fs = Rootfs(spec["scratch"])
    user = spec["user"]
    for path in spec["reachable"]:
        fs.reachable(path, user["uid"], set(user["groups"]))
    # The image's user, as its /etc/passwd and /etc/group have it (k8s/Dockerfile).
    fs.layer("/etc")
    with open("/etc/passwd", "a") as fh:
        fh.write(f"{user['name']}:x:{user['uid']}:{user['gid']}::{user['home']}:/usr/sbin/nologin\n")
    with open("/etc/group", "a") as fh:
        fh.write(f"{user['name']}:x:{user['gid']}:\n")
    fs.bind(app_fd, spec["app_target"], read_only_=True)
    for m in sorted(spec["binds"], key=lambda m: m["target"].count("/")):  # a folder before what is in it
        fs.bind(sources[m["target"]], m["target"], m["read_only"], is_dir=m["is_dir"])
    for m in spec["tmpfs"]:
        fs.tmpfs(m["target"], m["size"])
    if spec.get("app_also_at"):
        # The venv's scripts (torchserve, tsfleet) start with the absolute path of the python
        # they were installed with, the repo's; the image's name /opt/tsfleet. A repo that the
        # pod's volumes hide (a clone in /tmp) is bound back at its own path, read-only.
        fs.bind(app_fd, spec["app_also_at"], read_only_=True)
    fs.finish()
    doc: dict[str, Any] = {"mounts": mounts_seen(), "refused_as_root": refused_writes(spec["probe_writes"])}
    drop_privileges(user["uid"], user["gid"], user["groups"])
    doc["refused_as_user"] = refused_writes(spec["probe_writes"])
    doc["writable_as_user"] = refused_writes(spec["writable"])
    os.write(report, json.dumps(doc).encode())
    os.close(report)
    os.chdir(spec["cwd"])
    os.umask(0o022)
    argv = spec["command"]
    os.execvpe(argv[0], argv, spec["env"])


# --- the pod's clients -------------------------------------------------------------------

class Load:
    """Closed-loop clients, REST and gRPC, each sending its next request as soon as the last is
    answered, until the router refuses its connection (it stopped listening) or ``stop``.
    Every request is recorded with its outcome and monotonic start and end times."""

    def __init__(self, cmd: dict[str, Any]):
        self.cmd, self.records, self.lock = cmd, [], threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._rest, args=(i,), daemon=True)
                        for i in range(cmd["rest_clients"])]
        self.threads += [threading.Thread(target=self._grpc, args=(i,), daemon=True)
                         for i in range(cmd["grpc_clients"])]
        for t in self.threads:
            t.start()

    def _record(self, front: str, target: str, started: float, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.records.append({"front": front, "target": target, "start": started, "end": time.monotonic(),
                                 "outcome": outcome, "detail": detail[:300]})

    def _rest(self, i: int) -> None:
        import http.client

        requests = self.cmd["rest"]
        conn, n = None, i
        while not self.stop.is_set():
            req = requests[n % len(requests)]
            n += 1
            started = time.monotonic()
            answered = False
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.cmd["rest_port"], timeout=60)
                    conn.connect()
                headers = {"Content-Type": req["content_type"], "Authorization": f"Bearer {self.cmd['key']}"}
                conn.request("POST", req["path"], body=base64.b64decode(req["body"]), headers=headers)
                resp = conn.getresponse()
                answered = True
                body = resp.read()
                self._record("rest", req["path"], started, "ok" if resp.status == 200 else f"status {resp.status}",
                             body.decode(errors="replace") if resp.status != 200 else "")
                if resp.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except ConnectionRefusedError as exc:
                self._record("rest", req["path"], started, "refused", str(exc))
                return  # nothing listens any more: the router has stopped
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                # Closed with no byte of an answer: the router closed a connection between two
                # requests (it never read this one). Cut in the middle of an answer: a failure.
                self._record("rest", req["path"], started, "cut" if answered else "closed unanswered", repr(exc))
                conn.close()
                conn = None
            except Exception as exc:  # noqa: BLE001 (every other way a request can fail is recorded)
                self._record("rest", req["path"], started, "error", repr(exc))
                if conn is not None:
                    conn.close()
                conn = None

    def _grpc(self, i: int) -> None:
        import grpc

        from tsfleet.router.proto import inference_pb2 as pb
        from tsfleet.router.proto import inference_pb2_grpc as pb_grpc

        requests = self.cmd["grpc"]
        channel = grpc.insecure_channel(f"127.0.0.1:{self.cmd['grpc_port']}")
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        auth = (("authorization", f"Bearer {self.cmd['key']}"),)
        n = i
        try:
            while not self.stop.is_set():
                req = requests[n % len(requests)]
                n += 1
                started = time.monotonic()
                try:
                    stub.Predictions(pb.PredictionsRequest(model_name=req["model"],
                                                           input={"data": base64.b64decode(req["body"])}),
                                     metadata=auth, timeout=60)
                    self._record("grpc", req["model"], started, "ok")
                except grpc.RpcError as err:
                    code, details = err.code(), err.details() or ""
                    if code == grpc.StatusCode.UNAVAILABLE and _not_connected(details):
                        self._record("grpc", req["model"], started, "refused", details)
                        return
                    self._record("grpc", req["model"], started, f"code {code.name}", details)
        finally:
            channel.close()

    def counts(self) -> dict[str, Any]:
        """Requests so far by front and outcome, and the first few that were not answered 200."""
        with self.lock:
            out: dict[str, int] = {}
            for r in self.records:
                key = f"{r['front']} {r['outcome']}"
                out[key] = out.get(key, 0) + 1
            return {"counts": out, "failures": [r for r in self.records if r["outcome"] != "ok"][:5]}

    def finish(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.stop.set()
        for t in self.threads:
            t.join(5)
        with self.lock:
            return list(self.records)


def _not_connected(details: str) -> bool:
    """gRPC's words for a call that found no connection to make: it never reached the router."""
    return any(words in details for words in ("failed to connect", "Connection refused", "connect failed"))


def http_call(cmd: dict[str, Any]) -> dict[str, Any]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", cmd["port"], timeout=cmd.get("timeout", 10))
    try:
        body = base64.b64decode(cmd["body"]) if cmd.get("body") else None
        conn.request(cmd.get("method", "GET"), cmd["path"], body=body, headers=cmd.get("headers", {}))
        resp = conn.getresponse()
        return {"status": resp.status, "body": resp.read().decode(errors="replace")[:1_000_000]}
    except (OSError, http.client.HTTPException) as exc:
        return {"status": None, "error": repr(exc)}
    finally:
        conn.close()


def grpc_call(cmd: dict[str, Any]) -> dict[str, Any]:
    import grpc

    from tsfleet.router.proto import inference_pb2 as pb
    from tsfleet.router.proto import inference_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"127.0.0.1:{cmd['port']}") as channel:
        stub = pb_grpc.InferenceAPIsServiceStub(channel)
        try:
            request = pb.PredictionsRequest(model_name=cmd["model"], model_version=cmd.get("version", ""),
                                            input={"data": base64.b64decode(cmd["body"])})
            resp = stub.Predictions(request, metadata=(("authorization", f"Bearer {cmd['key']}"),),
                                    timeout=cmd.get("timeout", 60))
            return {"code": "OK", "prediction": resp.prediction.decode(errors="replace")[:1_000_000]}
        except grpc.RpcError as err:
            return {"code": err.code().name, "details": err.details()}


def run_client(netns: str) -> None:
    setns(netns, CLONE_NEWNET)
    load: Load | None = None
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd["op"]
        if op == "http":
            out = http_call(cmd)
        elif op == "grpc":
            out = grpc_call(cmd)
        elif op == "load":
            load = Load(cmd)
            out = {"started": True}
        elif op == "load_counts":
            out = load.counts() if load else {"counts": {}, "failures": []}
        elif op == "load_finish":
            out = {"records": load.finish(cmd["timeout"]) if load else []}
        else:
            out = {"error": f"unknown op {op}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


def main(argv: list[str]) -> int:
    if argv[:1] == ["container"]:
        run_container(json.loads(Path(argv[1]).read_text()))
        return 127  # not reached: the container's command replaced this process
    if argv[:1] == ["client"]:
        run_client(argv[1])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
