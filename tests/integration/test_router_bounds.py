"""What one hostile connection can cost a router process, read from the router's own /metrics
(tsfleet_router_process_*): its memory stays under the documented per-connection bound
(router.limits.buffered_bytes), its CPU far under a core, and everyone else is served."""
from __future__ import annotations

import threading
import time

import pytest
import requests

from tests.integration.hostile_peers import H2Client, grpc_message, healthy, router  # noqa: F401
from tests.prometheus_text import samples, value
from tsfleet.router.wire.h2frames import END_STREAM, HEADERS, PING, RST_STREAM, WINDOW_UPDATE
from tsfleet.router.wire.limits import DEFAULT_LIMITS

pytestmark = pytest.mark.integration
MIB = 1 << 20


def own_figures(router) -> tuple[float, int, dict[str, float]]:
    """(CPU seconds, resident bytes, limit hits) of the router process, from its /metrics."""
    text = requests.get(router.url + "/metrics", timeout=10).text
    cpu = value(text, "tsfleet_router_process_cpu_seconds_total", process="leader")
    rss = int(value(text, "tsfleet_router_process_resident_memory_bytes", process="leader"))
    hits = {dict(labels)["limit"]: n for labels, n in samples(text, "tsfleet_router_limit_hits_total").items()
            if dict(labels)["front"] == "grpc"}
    return cpu, rss, hits


def test_one_connection_holding_requests_open_stays_under_the_buffered_bound(router, server) -> None:
    """20 calls of 9 MiB each (under the message cap), none ended: 180 MiB offered on one
    connection; the router holds at most buffered_bytes of it and refuses the calls past it."""
    key = server.keys.inference
    _, rss_before, hits_before = own_figures(router)
    h2 = H2Client(router.grpc)
    h2.until(lambda f: f.type == WINDOW_UPDATE and not f.stream)  # the router's windows are open
    chunk, streams, refused, peak = bytes(h2.max_frame), range(1, 41, 2), set(), 0
    for stream in streams:
        h2.send(h2.call(stream, key) + h2.data(stream, grpc_message(b"", declared=9 * MIB)))
        left = 9 * MIB - 5
        deadline = time.monotonic() + 30
        while left > 0 and stream not in refused and time.monotonic() < deadline:
            room = min(len(chunk), left, h2.conn_window, h2.windows[stream])
            if room > 0:
                h2.send(h2.data(stream, chunk[:room]))
                left -= room
            for got in h2.until(lambda f: True, timeout=0 if room > 0 else 1):
                if got.type in (HEADERS, RST_STREAM) and got.stream:
                    refused.add(got.stream)
        peak = max(peak, own_figures(router)[1] - rss_before)
    # The last refusal may still be on its way when the last call has been offered (a loaded box).
    want = len(streams) - DEFAULT_LIMITS.buffered_bytes // (9 * MIB)
    deadline = time.monotonic() + 10
    while len(refused) < want and time.monotonic() < deadline:
        for got in h2.until(lambda f: True, timeout=1):
            if got.type in (HEADERS, RST_STREAM) and got.stream:
                refused.add(got.stream)
    cpu, rss, hits = own_figures(router)
    peak = max(peak, rss - rss_before)
    assert peak <= DEFAULT_LIMITS.buffered_bytes + 48 * MIB, f"{peak / MIB:.0f} MiB held for one connection"
    # 14 calls fit in 128 MiB; each one past it is refused (RESOURCE_EXHAUSTED), and counted.
    assert len(refused) == len(streams) - DEFAULT_LIMITS.buffered_bytes // (9 * MIB)
    assert hits["buffered_bytes"] - hits_before["buffered_bytes"] == len(refused)
    healthy(router, key)
    h2.close()


def test_a_busy_connection_under_every_budget_costs_a_fraction_of_a_core_and_others_are_served(router, server) -> None:
    """For 3 s one connection sends PINGs and connection WINDOW_UPDATEs just under the flood
    budgets, and calls whose every DATA frame holds one byte: the router's CPU (its own
    figure) stays under half a core, and another client's calls are answered meanwhile."""
    key = server.keys.inference
    h2 = H2Client(router.grpc)
    h2.until(lambda f: f.type == WINDOW_UPDATE and not f.stream)
    body = grpc_message(b"\n\x11intent-classifier")  # model_name only: a call TorchServe answers
    stop, answered = threading.Event(), []

    def others() -> None:
        while not stop.is_set():
            started = time.monotonic()
            healthy(router, key)
            answered.append(time.monotonic() - started)

    cpu_before = own_figures(router)[0]
    started = time.monotonic()
    side = threading.Thread(target=others)
    side.start()
    try:
        stream, sent = 1, 0
        while time.monotonic() - started < 3:
            h2.send(b"".join(bytes([0, 0, 8, PING, 0, 0, 0, 0, 0]) + sent.to_bytes(8, "big") for _ in range(8)))
            h2.send(bytes([0, 0, 4, WINDOW_UPDATE, 0, 0, 0, 0, 0, 0, 0, 0, 1]))
            h2.send(h2.call(stream, key) + b"".join(h2.data(stream, body[i:i + 1], end=i == len(body) - 1)
                                                   for i in range(len(body))))
            h2.until(lambda f: f.stream == stream and f.type == HEADERS and bool(f.flags & END_STREAM), timeout=5)
            stream, sent = stream + 2, sent + 1
            time.sleep(0.01)  # paced: about 800 PINGs a second, under the budget of 1,000
    finally:
        stop.set()
        side.join(30)
    wall, cpu = time.monotonic() - started, own_figures(router)[0] - cpu_before
    assert not h2.closed and sent > 20
    assert cpu < 0.5 * wall, f"the router used {cpu:.2f} s of CPU in {wall:.2f} s"
    assert answered and max(answered) < 2.0, answered
    h2.close()
