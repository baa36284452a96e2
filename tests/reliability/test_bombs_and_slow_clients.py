"""Decompression bombs and slow clients, against a `tsfleet route` process in front of the
session's TorchServe, TorchServe's own ports and a real recycler (docs/reliability.md, "Bad
requests and hostile clients").

Compression, wherever a client could send it:
- the router's gRPC front decompresses a message (grpc-encoding gzip or deflate) to at most
  its message limit: past it RESOURCE_EXHAUSTED naming the limit, counted as message_bytes;
  corrupt bytes INVALID_ARGUMENT (a 1 GiB bomb was held whole in its memory before);
- TorchServe's gRPC port takes gzip (grpc-java, bounded at max_request_size) and no deflate;
- REST bodies with a Content-Encoding reach the handler as sent, directly (Netty decompresses
  nothing) and through the router (which passes them on): the handler's 400;
- the router's admin API takes no Content-Encoding (415; aiohttp decompressed it, and corrupt
  gzip was a 500 with a traceback); the recycler's /metrics reads no body at all.

Slow clients: a head or body sent a byte a second to the admin API gets 408 at the router's
head_timeout_s / body_timeout_s (2 s here) and is closed; to the recycler's /metrics, 408 at
METRICS_HEAD_TIMEOUT_S. Normal calls are answered meanwhile.

After each case a REST and a gRPC call through the router are answered by the same process.
"""
from __future__ import annotations

import gzip
import json
import re
import select
import socket
import threading
import time
import zlib
from pathlib import Path
from typing import Iterator

import pytest
import requests
import yaml

from benchmarks.harness import RouterProcessRunner
from tests.fleet_fixtures import ROOT
from tests.grpc_raw import bomb, call, framed
from tests.integration.hostile_peers import healthy
from tests.polling import wait_for
from tests.prometheus_text import value
from tests.reliability.test_hostile_admin import metrics_answer, recycler  # noqa: F401 (a fixture)
from tsfleet.control.metrics_http import METRICS_HEAD_TIMEOUT_S
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.wire.limits import VERSION_ROOM, size

pytestmark = pytest.mark.reliability

HEAD_S = BODY_S = 2.0  # the router's head_timeout_s and body_timeout_s here (60 s by default)
MAX_REQUEST = 10 * 2**20  # TorchServe's max_request_size in the generated config.properties
TOO_LARGE = f"request larger than the router's {size(MAX_REQUEST - VERSION_ROOM)} once decompressed"
SLACK = 3.0  # a loaded 2-core machine's lateness on top of a deadline
TEXT = b'{"text": "cancel my plan"}'


class Router:
    """The router process, its admin API (from its banner) and the inference key clients send."""

    def __init__(self, runner: RouterProcessRunner, workdir: Path, key: str):
        self.runner, self.workdir, self.key = runner, workdir, key
        banner = (workdir / "router.log").read_text()
        self.admin = re.search(r"admin (http://[0-9.:]+)", banner).group(1)
        self.admin_headers = {"Authorization": f"Bearer {json.loads((workdir / 'router_key.json').read_text())['admin']}"}
        self.grpc_port = int(runner.grpc.rsplit(":", 1)[1])
        self.pid = runner.proc.pid

    def healthy(self) -> None:
        healthy(self.runner, self.key)
        assert self.runner.proc.pid == self.pid

    def bombs_counted(self) -> int:
        text = requests.get(self.runner.url + "/metrics", timeout=10).text
        return int(value(text, "tsfleet_router_limit_hits_total", limit="message_bytes", front="grpc"))

    def routes(self) -> dict:
        resp = requests.get(self.admin + "/routes", headers=self.admin_headers, timeout=10)
        assert resp.status_code == 200, resp.text
        return {m: {k: v for k, v in r.items() if k != "arms"} for m, r in resp.json().items()}


@pytest.fixture(scope="module")
def router(server, tmp_path_factory) -> Iterator[Router]:
    workdir = tmp_path_factory.mktemp("router-bombs")
    doc = yaml.safe_load((ROOT / "fleet.yaml").read_text())
    for model in doc["models"].values():  # the manifest lives elsewhere: its handlers where they are
        model["handler"] = str(ROOT / model["handler"])
    doc["router"] = {"limits": {"head_timeout_s": HEAD_S, "body_timeout_s": BODY_S}}
    (workdir / "fleet.yaml").write_text(yaml.safe_dump(doc))
    runner = RouterProcessRunner(workdir / "fleet.yaml", server.config, workdir)
    try:
        yield Router(runner, workdir, server.keys.inference)
        log = (workdir / "router.log").read_text()
        assert "Traceback" not in log, log[-3000:]  # every refusal above was an answer, never a fault
    finally:
        runner.stop()


def message(text: bytes = TEXT) -> bytes:
    return pb.PredictionsRequest(model_name="intent-classifier", input={"data": text}).SerializeToString()


# ------------------------------------------------------------------------------ gRPC

def test_a_grpc_bomb_through_the_router_is_resource_exhausted_naming_the_limit(router: Router) -> None:
    auth = [("authorization", f"Bearer {router.key}")]
    before = router.bombs_counted()
    cases = {"1 GiB of gzip, endless": (bomb(1024), "gzip"), "1 GiB of deflate, endless": (bomb(1024, "deflate"), "deflate"),
             "20 MiB, a whole gzip stream": (gzip.compress(message(bytes(20 << 20))), "gzip")}
    for case, (payload, encoding) in cases.items():
        began = time.monotonic()
        answer = call(router.grpc_port, framed(payload), auth + [("grpc-encoding", encoding)])
        assert (answer.get("grpc-status"), answer.get("grpc-message")) == ("8", TOO_LARGE), (case, answer)
        assert time.monotonic() - began < 10, case
        router.healthy()
    wait_for("the bombs counted as message_bytes", lambda: router.bombs_counted() == before + len(cases), timeout=10)


@pytest.mark.parametrize("payload, encoding, status, words", [
    (b"garbage", "gzip", "3", "the message is not valid gzip (Error -3 while decompressing data: incorrect header check)"),
    (gzip.compress(message())[:-10], "gzip", "3", "the message is not valid gzip (truncated)"),
    (zlib.compress(message())[:8], "deflate", "3", "the message is not valid deflate (truncated)"),
    # An encoding the router cannot read: the message cannot be read as a request either.
    (b"xx", "snappy", "3", "the message is not a PredictionsRequest (or not in the grpc-encoding the call names)"),
    (gzip.compress(message()), "gzip", "0", ""),
    (zlib.compress(message()), "deflate", "0", ""),
], ids=["garbage", "truncated-gzip", "truncated-deflate", "snappy", "gzip", "deflate"])
def test_compressed_bytes_the_router_cannot_read_are_invalid_argument(router: Router, payload: bytes, encoding: str,
                                                                     status: str, words: str) -> None:
    answer = call(router.grpc_port, framed(payload), [("authorization", f"Bearer {router.key}"),
                                                      ("grpc-encoding", encoding)])
    assert answer.get("grpc-status") == status, answer
    if status == "0":
        assert answer.get("x-model-version") == "1.0", answer
    else:
        assert answer.get("grpc-message") == words, answer
    router.healthy()


def test_torchserve_s_own_grpc_port_takes_gzip_bounded_and_no_deflate(server, router: Router) -> None:
    """Facts, checked so that a TorchServe that changes them is noticed: grpc-java decompresses
    gzip to at most max_request_size, but its RESOURCE_EXHAUSTED is lost in TorchServe's
    executor (a stack trace in its log) and the client reads UNKNOWN with no message."""
    auth = [("authorization", f"Bearer {server.keys.inference}")]
    port = server.ep.grpc_inference
    assert call(port, framed(gzip.compress(message())), auth + [("grpc-encoding", "gzip")])["grpc-status"] == "0"
    answer = call(port, framed(zlib.compress(message())), auth + [("grpc-encoding", "deflate")])
    assert (answer["grpc-status"], answer["grpc-message"]) == ("12", "Can't find decompressor for deflate"), answer
    began = time.monotonic()
    answer = call(port, framed(gzip.compress(message(bytes(20 << 20)))), auth + [("grpc-encoding", "gzip")])
    assert answer.get("grpc-status") == "2" and "grpc-message" not in answer, answer
    assert time.monotonic() - began < 10
    assert call(port, framed(message(), compressed=False), auth)["grpc-status"] == "0"
    router.healthy()


# ------------------------------------------------------------------------------ REST

@pytest.mark.parametrize("encoding, body", [("gzip", gzip.compress(TEXT)), ("deflate", zlib.compress(TEXT)),
                                            ("gzip", bomb(100))], ids=["gzip", "deflate", "bomb"])
def test_a_compressed_rest_body_reaches_the_handler_as_sent_directly_and_through_the_router(
        server, router: Router, encoding: str, body: bytes) -> None:
    headers = {"Authorization": f"Bearer {router.key}", "Content-Type": "application/json", "Content-Encoding": encoding}
    answers = [requests.post(base + "/predictions/intent-classifier", data=body, headers=headers, timeout=30)
               for base in (server.ep.url("inference"), router.runner.url)]
    for resp in answers:
        assert resp.status_code == 400, resp.text[:300]
        assert resp.json()["message"] == "intent-classifier 1.0: body is not valid UTF-8 (byte 1)"
    router.healthy()


def test_a_gzip_transfer_coding_is_refused_by_the_router(router: Router) -> None:
    z = gzip.compress(TEXT)
    raw = (b"POST /predictions/intent-classifier HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + router.key.encode()
           + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
           + b"%x\r\n" % len(z) + z + b"\r\n0\r\n\r\n")
    head, body = exchange(router.runner.url, raw)
    assert head.startswith(b"HTTP/1.1 501 ") and b"Connection: close" in head, head
    assert json.loads(body)["message"] == "Transfer-Encoding 'gzip, chunked' is not supported"
    router.healthy()


# ------------------------------------------------------------------------ admin, /metrics

@pytest.mark.parametrize("encoding, body", [
    ("gzip", gzip.compress(b'{"weights": {"1.0": 0, "1.1": 100}}')), ("deflate", zlib.compress(b'{"weights": {}}')),
    ("gzip", bomb(100)), ("gzip", b"garbage"), ("br", b"garbage"), ("zstd", b"garbage"), ("GZIP ", b"garbage"),
], ids=["gzip", "deflate", "bomb", "corrupt-gzip", "br", "zstd", "odd-case"])
def test_the_admin_api_takes_no_content_encoding(router: Router, encoding: str, body: bytes) -> None:
    before = router.routes()
    resp = requests.put(router.admin + "/routes/intent-classifier", data=body, timeout=30,
                        headers={**router.admin_headers, "Content-Type": "application/json", "Content-Encoding": encoding})
    assert resp.status_code == 415, resp.text[:300]
    assert resp.json()["message"] == (f"the admin API takes no Content-Encoding (got {encoding.strip().lower()!r}): "
                                      "send the body as it is")
    assert router.routes() == before
    router.healthy()


def test_the_recycler_s_metrics_read_no_body_and_compress_nothing(recycler: int) -> None:  # noqa: F811
    # The head of a gzip body, and no body: answered at once, so it never waits for one (a
    # body sent and left unread would make the close a reset, which may lose the answer).
    for method, status in (("GET", 200), ("POST", 405)):
        raw = (f"{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\nAccept-Encoding: gzip\r\n"
               f"Content-Length: {len(bomb(100))}\r\n\r\n").encode()
        head, body = exchange(f"http://127.0.0.1:{recycler}", raw)
        assert head.startswith(b"HTTP/1.0 %d " % status), head
        assert b"content-encoding" not in head.lower(), head
        if status == 200:
            assert b"tsfleet_worker_recycles_total" in body
    assert metrics_answer(recycler, "GET", "/metrics")[0] == 200


# ------------------------------------------------------------------------------ slow clients

def exchange(url: str, data: bytes) -> tuple[bytes, bytes]:
    """Send ``data`` on a fresh connection; the answer's head and body, read until closed."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=15) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # answered and closed before it was all sent: the answer is what counts
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    return head, body


class Trickle(threading.Thread):
    """A client that sends ``data`` a byte a second and records when it is answered and closed."""

    def __init__(self, url: str, data: bytes, fast: bytes = b""):
        super().__init__(daemon=True)
        host, port = url.removeprefix("http://").split(":")
        self.began = time.monotonic()  # the deadlines run from the connection
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.data, self.fast = data, fast
        self.answer, self.answered, self.closed = b"", None, None

    def run(self) -> None:
        began = self.began
        try:
            self.sock.sendall(self.fast)  # a head sent at once, for a slow body
            for i in range(len(self.data) + 60):
                if select.select([self.sock], [], [], 1.0)[0]:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        break
                    self.answer += chunk
                    self.answered = self.answered or time.monotonic() - began
                elif i < len(self.data):
                    self.sock.send(self.data[i:i + 1])
        except OSError:
            pass  # reset: closed
        finally:
            self.closed = time.monotonic() - began
            self.sock.close()


def trickle_many(url: str, data: bytes, n: int, fast: bytes = b"") -> list[Trickle]:
    clients = []
    for _ in range(n):
        clients.append(Trickle(url, data, fast))
        clients[-1].start()
    return clients


def test_slow_heads_and_bodies_on_the_admin_api_get_408_and_are_closed(router: Router) -> None:
    head = b"PUT /routes/intent-classifier HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    body = b'{"weights": {"1.0": 100}}'
    full_head = head + b"Authorization: " + router.admin_headers["Authorization"].encode() + \
        b"\r\nContent-Length: %d\r\n\r\n" % (len(body) + 40)
    before = router.routes()
    heads = trickle_many(router.admin, head + b"X-Pad: " + b"x" * 60, 20)
    bodies = trickle_many(router.admin, body + b" " * 40, 5, fast=full_head)
    # Meanwhile normal calls are answered at once.
    for _ in range(5):
        began = time.monotonic()
        router.routes()
        assert time.monotonic() - began < 2
    for client in heads + bodies:
        client.join(HEAD_S + 10 + 2 * SLACK)
        assert not client.is_alive()
    for client in heads:
        status, _, message = client.answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), client.answer
        assert json.loads(message)["message"] == f"no whole request head within {HEAD_S:g} s"
        assert HEAD_S - 0.5 < client.answered < HEAD_S + SLACK and client.closed < HEAD_S + SLACK, vars(client)
    for client in bodies:
        status, _, message = client.answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), client.answer
        assert json.loads(message)["message"] == f"the request body was not received whole within {BODY_S:g} s"
        assert BODY_S - 0.5 < client.answered < BODY_S + SLACK, vars(client)
        # Then the body's rest is read for head_timeout_s (a client still sending reads its
        # answer), and the connection closed.
        assert BODY_S + HEAD_S - 0.5 < client.closed < BODY_S + HEAD_S + SLACK, vars(client)
    assert router.routes() == before  # no trickled change was taken
    router.healthy()


def test_slow_heads_on_the_recycler_s_metrics_get_408_and_are_closed(recycler: int) -> None:  # noqa: F811
    url = f"http://127.0.0.1:{recycler}"
    clients = trickle_many(url, b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"x" * 60, 20)
    for _ in range(5):
        began = time.monotonic()
        assert metrics_answer(recycler, "GET", "/metrics")[0] == 200
        assert time.monotonic() - began < 2
    for client in clients:
        client.join(METRICS_HEAD_TIMEOUT_S + 2 * SLACK)
        assert not client.is_alive()
        status, _, message = client.answer.partition(b"\r\n\r\n")
        assert status.startswith(b"HTTP/1.0 408 Request Timeout\r\n"), client.answer
        assert message == f"no whole request head within {METRICS_HEAD_TIMEOUT_S:g} s\n".encode()
        assert METRICS_HEAD_TIMEOUT_S - 0.5 < client.answered < METRICS_HEAD_TIMEOUT_S + SLACK, vars(client)
        assert client.closed < METRICS_HEAD_TIMEOUT_S + SLACK, vars(client)
    assert metrics_answer(recycler, "GET", "/metrics")[0] == 200
