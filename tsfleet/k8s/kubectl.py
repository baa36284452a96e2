"""A small client of the Kubernetes API, as a pod's service account calls it: read and
merge-patch a ConfigMap, post an Event. The router records an automatic rollback with it
(tsfleet/router/rollback_record.py), so that every replica, and a pod started later, keeps
the bad version out of rotation.

It is deliberately small: the router needs three calls, and a full client library (and its
dependencies) for them would be most of the router's image. Every call has a timeout and is
made once (the caller decides whether to try again), TLS is checked against the service
account's CA, and the token is read from its file at each call, since a projected token is
replaced by the kubelet before it expires. The token is a secret: no message or log line
carries it.
"""
from __future__ import annotations

import asyncio
import json
import os
import ssl
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import aiohttp

from tsfleet.errors import KubeError

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
TIMEOUT_S = 5.0
MERGE_PATCH = "application/merge-patch+json"


class KubeApi:
    """The API server at ``server`` for objects of ``namespace``, with the bearer token in
    ``token_file`` and, for https, the CA bundle ``ca_file``."""

    def __init__(self, server: str, namespace: str, token_file: Path, ca_file: Path | None = None,
                 timeout_s: float = TIMEOUT_S):
        self.server, self.namespace = server.rstrip("/"), namespace
        self.token_file, self.timeout_s = Path(token_file), timeout_s
        self._tls: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(ca_file)) if ca_file else True

    @classmethod
    def in_cluster(cls, account_dir: Path = SERVICE_ACCOUNT_DIR, env: Mapping[str, str] | None = None,
                   timeout_s: float = TIMEOUT_S) -> "KubeApi | None":
        """The API as a pod sees it (``KUBERNETES_SERVICE_HOST``/``_PORT`` and the service
        account's token, ca.crt and namespace under ``account_dir``); None outside a pod, or in
        one that was given no token."""
        env = os.environ if env is None else env
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        token, ca, namespace = (Path(account_dir) / name for name in ("token", "ca.crt", "namespace"))
        if not (host and port and token.is_file() and ca.is_file() and namespace.is_file()):
            return None
        host = f"[{host}]" if ":" in host else host  # an IPv6 cluster
        return cls(f"https://{host}:{port}", namespace.read_text().strip(), token, ca, timeout_s)

    def __repr__(self) -> str:  # no token here, ever
        return f"KubeApi({self.server!r}, namespace={self.namespace!r})"

    # ------------------------------------------------------------------ calls
    async def get_configmap(self, name: str) -> dict[str, Any]:
        """The ConfigMap ``name`` as the API returns it (``data``, ``metadata.resourceVersion``...)."""
        return await self._call("GET", f"/api/v1/namespaces/{self.namespace}/configmaps/{name}",
                                f"get configmap {self.namespace}/{name}")

    async def patch_configmap(self, name: str, data: dict[str, str], resource_version: str | None = None) -> dict[str, Any]:
        """Set ``data``'s keys of ConfigMap ``name`` (a JSON merge patch: other keys stay). With
        ``resource_version``, only if nobody changed it since it was read (else KubeError 409)."""
        body: dict[str, Any] = {"data": data}
        if resource_version:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self._call("PATCH", f"/api/v1/namespaces/{self.namespace}/configmaps/{name}",
                                f"patch configmap {self.namespace}/{name}", body, MERGE_PATCH)

    async def create_event(self, involved: dict[str, str], reason: str, message: str, component: str,
                           host: str = "", kind: str = "Warning") -> dict[str, Any]:
        """A core/v1 Event about ``involved`` (``{"kind", "name"}`` of an object of this
        namespace), as ``kubectl describe`` and ``kubectl get events`` show them."""
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{involved['name']}.", "namespace": self.namespace},
                "involvedObject": {"apiVersion": "v1", "namespace": self.namespace, **involved},
                "reason": reason, "message": message[:1024], "type": kind, "count": 1,
                "firstTimestamp": now, "lastTimestamp": now,
                "source": {"component": component, **({"host": host} if host else {})}}
        return await self._call("POST", f"/api/v1/namespaces/{self.namespace}/events",
                                f"create event {reason} about {involved['kind']} {involved['name']}", body,
                                "application/json")

    async def _call(self, method: str, path: str, what: str, body: dict[str, Any] | None = None,
                    content_type: str = "application/json") -> dict[str, Any]:
        """One request and its JSON answer; KubeError for an error status or no answer in time."""
        try:
            token = self.token_file.read_text().strip()
        except OSError as exc:
            raise KubeError(what, 0, f"the service account token cannot be read ({exc.strerror})") from None
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            # trust_env off: an HTTP(S)_PROXY meant for the pod's other traffic must not carry the token.
            async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as client:
                async with client.request(method, self.server + path, headers=headers, ssl=self._tls,
                                          data=json.dumps(body).encode() if body is not None else None) as resp:
                    text = await resp.text()
                    status = resp.status
        except asyncio.TimeoutError:
            raise KubeError(what, 0, f"the API server at {self.server} did not answer within {self.timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError, ssl.SSLError) as exc:
            raise KubeError(what, 0, f"the API server at {self.server} cannot be reached ({type(exc).__name__})") from None
        if status >= 400:
            raise KubeError(what, status, _message(text))
        try:
            return json.loads(text) if text else {}
        except ValueError:
            raise KubeError(what, status, "the answer is not JSON") from None


def _message(text: str) -> str:
    """The API's own words from a Status answer, else the start of the body."""
    try:
        doc = json.loads(text)
        if isinstance(doc, dict) and isinstance(doc.get("message"), str):
            return doc["message"][:500]
    except ValueError:
        pass
    return text[:200]
