"""Where `tsfleet recycle` serves its /metrics: loopback unless told otherwise (one machine),
the address --metrics-host names in a pod, where Prometheus scrapes it from another pod."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import requests

from tsfleet import cli
from tsfleet.control.recycle import Recycler

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_recycle(extra: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[list, list[str], str]:
    """`tsfleet recycle` through its real parser and command, up to its first look: the
    servers it opened, what it said, and its /metrics as scraped over loopback meanwhile."""
    servers: list = []
    said: list[str] = []
    scraped: dict[str, str] = {}
    opened = cli._metrics_server

    def recording(host: str, port: int, metrics):  # type: ignore[no-untyped-def]
        servers.append(opened(host, port, metrics))
        return servers[-1]

    def first_look(recycler: Recycler, interval_s: float = 2.0, **kw: object) -> None:
        if servers:
            port = servers[-1].server_address[1]
            scraped["text"] = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            scraped["other"] = str(requests.get(f"http://127.0.0.1:{port}/", timeout=10).status_code)

    monkeypatch.setattr(cli, "_metrics_server", recording)
    monkeypatch.setattr(cli, "_say", said.append)
    monkeypatch.setattr(Recycler, "run", first_look)
    monkeypatch.setattr(cli.signal, "signal", lambda *a: None)  # leave the test runner's SIGTERM alone
    try:
        assert cli.main(["--manifest", str(ROOT / "fleet.yaml"), "--config", str(ROOT / "config.properties"),
                         "--key-file", str(tmp_path / "key_file.json"), "--report-dir", str(tmp_path / "reports"),
                         "recycle", *extra]) == 0
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
    return servers, said, scraped.get("text", "") + scraped.get("other", "")


def test_the_recycler_s_metrics_stay_on_loopback_by_default(monkeypatch, tmp_path) -> None:
    port = free_port()
    servers, said, scraped = run_recycle(["--metrics-port", str(port)], monkeypatch, tmp_path)
    assert [s.server_address[:2] for s in servers] == [("127.0.0.1", port)]
    assert f"recycler metrics at http://127.0.0.1:{port}/metrics" in said
    assert "# TYPE tsfleet_workers_ready gauge" in scraped and scraped.endswith("404")


def test_metrics_host_binds_the_address_given(monkeypatch, tmp_path) -> None:
    port = free_port()
    servers, said, scraped = run_recycle(["--metrics-host", "0.0.0.0", "--metrics-port", str(port)],
                                         monkeypatch, tmp_path)
    assert [s.server_address[:2] for s in servers] == [("0.0.0.0", port)]
    assert f"recycler metrics at http://0.0.0.0:{port}/metrics" in said
    assert "# TYPE tsfleet_workers_ready gauge" in scraped


def test_metrics_port_0_opens_nothing(monkeypatch, tmp_path) -> None:
    servers, said, _ = run_recycle(["--metrics-host", "0.0.0.0", "--metrics-port", "0"], monkeypatch, tmp_path)
    assert servers == [] and not any("metrics at" in line for line in said)


def test_an_ipv6_metrics_host_gets_an_ipv6_listener() -> None:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    server = cli._metrics_server("::1", 0, lambda: "up_total 1\n")
    try:
        assert server.socket.family == socket.AF_INET6
        got = requests.get(f"http://[::1]:{server.server_address[1]}/metrics", timeout=10)
        assert got.status_code == 200 and got.text == "up_total 1\n"
    finally:
        server.shutdown()
        server.server_close()
