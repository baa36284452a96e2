"""The Kubernetes API client (tsfleet/k8s/kubectl.py) and the rollback recorder built on it
(tsfleet/router/rollback_record.py): their unit tests. There is no cluster here: a small
aiohttp server on 127.0.0.1 plays the API server (over HTTPS with a CA of its own where
openssl is installed, as a pod's service account sees it), records what it was sent and
answers as the API would, a 403 from RBAC and a 409 conflict included."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.polling import until
from tests.prometheus_text import value
from tsfleet.errors import KubeError
from tsfleet.k8s.kubectl import KubeApi
from tsfleet.router.policy import routes_doc
from tsfleet.router.policy.routing import RollbackRule, Route, RoutingTable
from tsfleet.router.rollback_record import RollbackRecorder

TOKEN = "eyJhbGciOi.not-a-real-token.s3cr3t"
VERSIONS = {"m": ("1.0", "1.1"), "n": ("2.0",)}


@dataclass
class FakeApi:
    """The API server's side: one ConfigMap, the Events posted, what each request carried."""

    routes: dict[str, Any]
    patch_status: list[int] = field(default_factory=list)  # answers to the next PATCHes (then 200)
    event_status: int = 201
    resource_version: int = 7
    requests: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/api/v1/namespaces/fleet/configmaps/tsfleet-routes", self.get),
                        web.patch("/api/v1/namespaces/fleet/configmaps/tsfleet-routes", self.patch),
                        web.post("/api/v1/namespaces/fleet/events", self.event)])
        return app

    def _seen(self, request: web.Request, body: Any) -> None:
        self.requests.append((request.method, request.path, dict(request.headers), body))

    def configmap(self) -> dict[str, Any]:
        return {"kind": "ConfigMap", "metadata": {"name": "tsfleet-routes", "resourceVersion": str(self.resource_version)},
                "data": {"routes.json": routes_doc.dumps(self.routes)}}

    async def get(self, request: web.Request) -> web.Response:
        self._seen(request, None)
        return web.json_response(self.configmap())

    async def patch(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._seen(request, body)
        status = self.patch_status.pop(0) if self.patch_status else 200
        if status == 200:
            self.routes = json.loads(body["data"]["routes.json"])
            self.resource_version += 1
            return web.json_response(self.configmap())
        if status == 409:
            self.resource_version += 1  # someone else's write got in first
        reason = {403: "Forbidden", 409: "Conflict"}[status]
        return web.json_response({"kind": "Status", "status": "Failure", "reason": reason, "code": status,
                                  "message": f'configmaps "tsfleet-routes" is {reason.lower()}'}, status=status)

    async def event(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._seen(request, body)
        if self.event_status >= 400:
            return web.json_response({"kind": "Status", "message": "events is forbidden"}, status=self.event_status)
        self.events.append(body)
        return web.json_response({**body, "metadata": {"name": "x.1"}}, status=201)


async def serving(api: FakeApi, tls: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(api.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
    await site.start()
    return runner, runner.addresses[0][1]


def account(tmp_path: Path, ca: bytes = b"unused") -> Path:
    """A service account's mounted files, as the kubelet projects them."""
    folder = tmp_path / "serviceaccount"
    folder.mkdir(exist_ok=True)
    (folder / "token").write_text(TOKEN + "\n")
    (folder / "ca.crt").write_bytes(ca)
    (folder / "namespace").write_text("fleet")
    return folder


def doc(weights: dict[str, float]) -> dict[str, Any]:
    return {"routes": {"m": {"baseline": "1.0", "weights": weights},
                       "n": {"baseline": "2.0", "weights": {"2.0": 100}}}}


def table() -> RoutingTable:
    return RoutingTable({"m": Route("m", "1.0", {"1.0": 50.0, "1.1": 50.0}, versions=VERSIONS["m"]),
                         "n": Route("n", "2.0", {"2.0": 100.0}, versions=VERSIONS["n"])})


def recorder(tbl: RoutingTable, api: KubeApi | None) -> RollbackRecorder:
    return RollbackRecorder(tbl, "tsfleet-routes", "routes.json", api, lambda: VERSIONS, pod="tsfleet-abc-1")


EVENT = {"version": "1.1", "reason": "error rate 40% vs baseline 0% over 60 s", "at": 1.0}


def test_a_merge_patch_with_the_bearer_token_and_the_resource_version(tmp_path: Path) -> None:
    fake = FakeApi(doc({"1.0": 50, "1.1": 50}))

    async def scenario() -> None:
        runner, port = await serving(fake)
        try:
            api = KubeApi(f"http://127.0.0.1:{port}", "fleet", account(tmp_path) / "token")
            found = await api.get_configmap("tsfleet-routes")
            assert found["metadata"]["resourceVersion"] == "7"
            await api.patch_configmap("tsfleet-routes", {"routes.json": "{}"}, "7")
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    (method, _, headers, body) = fake.requests[-1]
    assert method == "PATCH" and headers["Content-Type"] == "application/merge-patch+json"
    assert headers["Authorization"] == f"Bearer {TOKEN}"  # read from the file, its newline dropped
    assert body == {"data": {"routes.json": "{}"}, "metadata": {"resourceVersion": "7"}}


def test_a_rollback_is_written_into_the_configmap_for_every_replica(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    fake = FakeApi(doc({"1.0": 50, "1.1": 50}), patch_status=[409])  # a conflict first: read again
    tbl = table()

    async def scenario() -> None:
        runner, port = await serving(fake)
        try:
            rec = recorder(tbl, KubeApi(f"http://127.0.0.1:{port}", "fleet", account(tmp_path) / "token"))
            rec.start()
            # The hook as the table calls it after an automatic rollback: in the background.
            tbl.routes["m"].rollback = RollbackRule(window_s=60, min_samples=5, max_p99_ratio=0)
            tbl.on_rollback = rec.rolled_back
            for i in range(5):
                tbl.record("m", "1.0", True, 0.01, now=i)
                tbl.record("m", "1.1", False, 0.01, now=i)
            assert tbl.routes["m"].weights["1.1"] == 0  # at once, before anything is written
            await until("the rollback recorded", lambda: rec.recorded, timeout=10)
            assert rec.unrecorded == 0 and value(rec.prometheus(), "tsfleet_router_rollback_recorded_total") == 1
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    assert [m for m, *_ in fake.requests] == ["GET", "PATCH", "GET", "PATCH"]
    assert fake.requests[-1][3]["metadata"] == {"resourceVersion": "8"}  # the one read after the conflict
    m = fake.routes["routes"]["m"]
    assert m["weights"] == {"1.0": 50, "1.1": 0.0} and m["rolled_back"]["version"] == "1.1"
    assert fake.routes["routes"]["n"] == {"baseline": "2.0", "weights": {"2.0": 100}}
    routes_doc.check_routes(fake.routes, VERSIONS)  # what every router will take
    assert "recorded in ConfigMap fleet/tsfleet-routes" in caplog.text and TOKEN not in caplog.text


def test_forbidden_by_rbac_posts_an_event_and_counts_it(tmp_path: Path, caplog) -> None:
    fake = FakeApi(doc({"1.0": 50, "1.1": 50}), patch_status=[403])

    async def scenario() -> RollbackRecorder:
        runner, port = await serving(fake)
        try:
            rec = recorder(table(), KubeApi(f"http://127.0.0.1:{port}", "fleet", account(tmp_path) / "token"))
            assert await rec.record("m", "1.1", EVENT) is False
            return rec
        finally:
            await runner.cleanup()

    rec = asyncio.run(scenario())
    assert rec.unrecorded == 1 and value(rec.prometheus(), "tsfleet_router_rollback_unrecorded_total") == 1
    assert len(fake.events) == 1
    event = fake.events[0]
    assert event["involvedObject"] == {"apiVersion": "v1", "namespace": "fleet", "kind": "Pod", "name": "tsfleet-abc-1"}
    assert event["reason"] == "RollbackNotRecorded" and event["type"] == "Warning"
    assert "rolled back m 1.1" in event["message"] and "403" in event["message"]
    assert "on this replica only" in caplog.text and "403" in caplog.text and TOKEN not in caplog.text


def test_no_event_either_is_only_a_warning(tmp_path: Path, caplog) -> None:
    fake = FakeApi(doc({"1.0": 50, "1.1": 50}), patch_status=[403], event_status=403)

    async def scenario() -> RollbackRecorder:
        runner, port = await serving(fake)
        try:
            rec = recorder(table(), KubeApi(f"http://127.0.0.1:{port}", "fleet", account(tmp_path) / "token"))
            await rec.record("m", "1.1", EVENT)
            return rec
        finally:
            await runner.cleanup()

    assert asyncio.run(scenario()).unrecorded == 1
    assert "no Event either" in caplog.text


def test_an_unreachable_api_or_no_service_account_is_counted_not_waited_for(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once it is closed

    async def scenario() -> tuple[RollbackRecorder, RollbackRecorder]:
        gone = recorder(table(), KubeApi(f"http://127.0.0.1:{port}", "fleet", account(tmp_path) / "token",
                                         timeout_s=2))
        outside = recorder(table(), None)
        await asyncio.wait_for(asyncio.gather(gone.record("m", "1.1", EVENT), outside.record("m", "1.1", EVENT)), 10)
        return gone, outside

    gone, outside = asyncio.run(scenario())
    assert gone.unrecorded == outside.unrecorded == 1


def test_errors_carry_the_api_s_words_and_never_the_token(tmp_path: Path) -> None:
    fake = FakeApi(doc({"1.0": 100}), patch_status=[403])

    async def scenario() -> KubeError:
        runner, port = await serving(fake)
        try:
            api = KubeApi(f"http://127.0.0.1:{port}", "fleet", account(tmp_path) / "token")
            with pytest.raises(KubeError) as caught:
                await api.patch_configmap("tsfleet-routes", {"routes.json": "{}"})
            assert TOKEN not in repr(api)
            return caught.value
        finally:
            await runner.cleanup()

    exc = asyncio.run(scenario())
    assert exc.status == 403 and 'configmaps "tsfleet-routes" is forbidden' in str(exc) and TOKEN not in str(exc)


def test_in_cluster_only_with_the_service_account_and_the_api_s_address(tmp_path: Path) -> None:
    folder = account(tmp_path)
    env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    assert KubeApi.in_cluster(folder, {}) is None  # not in a pod
    assert KubeApi.in_cluster(tmp_path / "absent", env) is None  # a pod given no token
    (folder / "ca.crt").unlink()
    assert KubeApi.in_cluster(folder, env) is None


def _tls_files(tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 that is its own CA, as a cluster's CA signs the API server's."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a certificate")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def test_in_a_pod_it_speaks_tls_checked_against_the_service_account_s_ca(tmp_path: Path) -> None:
    cert, key = _tls_files(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    fake = FakeApi(doc({"1.0": 100}))

    async def scenario() -> None:
        runner, port = await serving(fake, tls)
        try:
            env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(port)}
            api = KubeApi.in_cluster(account(tmp_path, cert.read_bytes()), env)
            assert api is not None and api.server == f"https://127.0.0.1:{port}" and api.namespace == "fleet"
            assert (await api.get_configmap("tsfleet-routes"))["metadata"]["resourceVersion"] == "7"
            # Another CA: the server is not trusted, and nothing (the token least of all) is sent.
            other = tmp_path / "other"
            other.mkdir()
            stranger = account(other, _tls_files(other)[0].read_bytes())
            with pytest.raises(KubeError) as caught:
                await KubeApi.in_cluster(stranger, env).get_configmap("tsfleet-routes")
            assert caught.value.status == 0
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    assert len(fake.requests) == 1
