"""config.properties for a fleet: rendered from the manifest, so the two cannot drift.

The same renderer writes the repo's committed ``config.properties`` (default ports, relative
model_store, for ``torchserve --start --ts-config config.properties``) and the private
configs tests start servers with (free ports, their own store).
"""
from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tsfleet.manifest import Fleet

HEADER = """\
# Generated from fleet.yaml by `tsfleet config`: edit the manifest, then re-run it.
# Security defaults stay on: token authorization (keys in key_file.json where the server
# starts), loopback-only listeners, and the model API limited to archives already in
# model_store (registered by file name; allowed_urls matches no URL, so nothing is fetched).
# Logging: tsfleet/build/log4j2.xml (one access line per request, files rolled and capped).
"""

LOG_CONFIG = Path(__file__).with_name("log4j2.xml")


@dataclass(frozen=True)
class Endpoints:
    """Where one TorchServe listens."""

    host: str = "127.0.0.1"
    inference: int = 8080
    management: int = 8081
    metrics: int = 8082
    grpc_inference: int = 7070
    grpc_management: int = 7071
    # Workers talk to the frontend on sockets numbered from here; two servers on one
    # machine need different ranges.
    worker_base: int = 9000

    def url(self, which: str) -> str:
        return f"http://{self.host}:{getattr(self, which)}"

    @classmethod
    def on_free_ports(cls) -> "Endpoints":
        """Loopback ports the kernel says are free now: for a server beside another one."""
        socks = [socket.socket() for _ in range(5)]
        try:
            for s in socks:
                s.bind(("127.0.0.1", 0))
            ports = [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()
        return cls("127.0.0.1", *ports, worker_base=ports[0] % 20000 + 20000)

    @classmethod
    def from_properties(cls, path: Path) -> "Endpoints":
        """The endpoints a config.properties file sets (TorchServe's defaults elsewhere)."""
        props = read_properties(path)
        defaults = cls()

        def port(key: str, default: int) -> int:
            value = props.get(key)
            return int(value.rsplit(":", 1)[1]) if value and ":" in value else int(value or default)

        host = urlparse(props.get("inference_address", defaults.url("inference"))).hostname or defaults.host
        return cls(
            host,
            port("inference_address", defaults.inference),
            port("management_address", defaults.management),
            port("metrics_address", defaults.metrics),
            port("grpc_inference_port", defaults.grpc_inference),
            port("grpc_management_port", defaults.grpc_management),
            port("initial_worker_port", defaults.worker_base),
        )


def read_properties(path: Path) -> dict[str, str]:
    """A Java properties file's keys and values (continuation lines joined)."""
    text = Path(path).read_text().replace("\\\n", "")
    props = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def models_json(fleet: Fleet) -> dict:
    """The ``models`` property: per version, its archive, workers, batching and default flag."""
    out: dict = {}
    for model in fleet.models.values():
        for version, spec in model.versions.items():
            s = spec.serving
            out.setdefault(model.name, {})[version] = {
                "defaultVersion": version == model.default_version,
                "marName": spec.archive_name,
                "minWorkers": s.workers,
                "maxWorkers": s.worker_ceiling,
                "batchSize": s.batch_size,
                "maxBatchDelay": s.max_batch_delay_ms,
                "responseTimeout": s.response_timeout_s,
            }
    return out


def render_properties(fleet: Fleet, ep: Endpoints = Endpoints(), model_store: str = "model_store",
                      load_models: bool = True) -> str:
    """The config.properties text for ``fleet`` served at ``ep`` from ``model_store``.

    ``load_models=False`` starts a server with no models, for ``tsfleet apply`` to fill.
    """
    archives = ",".join(spec.archive_name for spec in fleet.versions())
    models = json.dumps(models_json(fleet), indent=2, sort_keys=True).replace("\n", "\\\n")
    props = [
        ("inference_address", ep.url("inference")),
        ("management_address", ep.url("management")),
        ("metrics_address", ep.url("metrics")),
        ("grpc_inference_address", ep.host),
        ("grpc_management_address", ep.host),
        ("grpc_inference_port", ep.grpc_inference),
        ("grpc_management_port", ep.grpc_management),
        ("initial_worker_port", ep.worker_base),
        ("model_store", model_store),
        ("workflow_store", model_store),
        *([("load_models", archives), ("models", models)] if load_models else []),
        ("disable_token_authorization", "false"),
        ("enable_model_api", "true"),
        ("allowed_urls", "^$"),
        ("install_py_dep_per_model", "false"),
        ("metrics_mode", "prometheus"),
        ("model_metrics_auto_detect", "true"),
        ("job_queue_size", 1000),
        ("default_response_timeout", 120),
        ("unregister_model_timeout", 120),
        ("max_request_size", 10 * 2**20),
        ("max_response_size", 10 * 2**20),
        # Workers hand the handler the client's bytes: it parses JSON once, within each
        # model's limits, where TorchServe's own parse logged a traceback per bad body.
        ("decode_input_request", "false"),
        # Relative, like model_store: a plain `torchserve --start` from the repo finds it;
        # tsfleet passes the absolute path with --log-config, which takes its place.
        ("vmargs", f"-Dlog4j.configurationFile={'/'.join(LOG_CONFIG.parts[-3:])}"),
    ]
    return HEADER + "".join(f"{key}={value}\n" for key, value in props)
