"""What the router says when it says no: one error body (tsfleet/errors.py) for every answer of
its own, the HTTP status each error class names, and gRPC codes as grpc.StatusCode with the
same numbers on the wire."""
from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from grpc import StatusCode

from tests.unit.test_admin_deadlines import AUTH, body_of, exchange, serve
from tsfleet.errors import ManifestError, StorageError, error_body, http_answer
from tsfleet.router.fronts.admin import AdminApi
from tsfleet.router.fronts.admin_site import _answer
from tsfleet.router.wire.grpc_answers import _whose_fault
from tsfleet.router.wire.grpc_upstream import UpstreamCall
from tsfleet.router.wire.grpc_wire import CODES, WIRE_CODES, status_trailers
from tsfleet.router.wire.http1 import ROUTER_ERROR, TOO_MANY


def test_the_router_s_own_error_bodies_are_the_bytes_they_were() -> None:
    # Written by hand before; clients (and their tests) may compare them byte for byte.
    assert ROUTER_ERROR.body == b'{"code": 500, "type": "InternalServerError", "message": "router error"}'
    assert TOO_MANY.body == (b'{"code": 503, "type": "ServiceUnavailable", '
                             b'"message": "too many connections to this router process"}')
    assert _answer(408, "Request Timeout", "no whole request head within 60 s").endswith(
        b'\r\n\r\n{"code": 408, "type": "RequestTimeout", "message": "no whole request head within 60 s"}')
    # http1's refusals named the status as its reason phrase, title-cased, without spaces or dashes.
    for status, kind in ((400, "BadRequest"), (408, "RequestTimeout"), (413, "RequestEntityTooLarge"),
                         (414, "RequestUriTooLong"), (431, "RequestHeaderFieldsTooLarge"), (599, "Error")):
        assert json.loads(error_body(status, "m")) == {"code": status, "type": kind, "message": "m"}
    assert error_body(404, "gone", "ModelNotFound", models=["a"]) == \
        b'{"code": 404, "type": "ModelNotFound", "message": "gone", "models": ["a"]}'


def test_each_error_answers_with_the_status_its_class_names(tmp_path: Path) -> None:
    full = StorageError.writing(tmp_path / "router_state.json", OSError(errno.ENOSPC, "No space left on device"))
    status, body = http_answer(full)
    assert status == 507 and json.loads(body) == {"code": 507, "type": "InsufficientStorage", "message": str(full)}
    assert http_answer(ManifestError("bad"))[0] == 400


@pytest.mark.parametrize("request_line, body", [
    (b"PUT /routes/m", b'{"weights": {"1.0": 100}}'),
    (b"POST /keys/inference", b'{"grace_s": 5}'),
])
def test_a_change_the_disk_refuses_is_a_507_in_the_error_s_words(tmp_path: Path, request_line: bytes,
                                                                 body: bytes) -> None:
    full = StorageError.writing(tmp_path / "router_state.json", OSError(errno.ENOSPC, "No space left on device"))

    async def test(port: int, api: AdminApi) -> None:
        def refuse(*args: Any, **kwargs: Any) -> None:
            raise full

        async def rotate(grace: float) -> dict[str, Any]:
            raise full

        api.table.save, api.rotate = refuse, rotate
        before = {m: (dict(r.weights), r.baseline) for m, r in api.table.routes.items()}
        answer, _ = await exchange(port, request_line + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + AUTH
                                   + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        assert answer.startswith(b"HTTP/1.1 507 Insufficient Storage\r\n"), answer
        assert b"\r\nContent-Type: application/json; charset=utf-8\r\n" in answer
        assert body_of(answer) == {"code": 507, "type": "InsufficientStorage", "message": str(full)}
        # Refused is refused: the change is not live either (the routes are as they were).
        assert {m: (dict(r.weights), r.baseline) for m, r in api.table.routes.items()} == before

    serve(test)


def test_grpc_codes_go_on_the_wire_as_their_numbers() -> None:
    assert len(WIRE_CODES) == len(StatusCode) == 17
    for code in StatusCode:
        assert status_trailers(code, "a b%") == [(b"grpc-status", str(code.value[0]).encode()),
                                                 (b"grpc-message", b"a b%25")]
        assert CODES[str(code.value[0]).encode()] is code
    assert WIRE_CODES[StatusCode.RESOURCE_EXHAUSTED] == b"8" and WIRE_CODES[StatusCode.UNAVAILABLE] == b"14"


def _answered(trailers: list[tuple[bytes, bytes]], headers: list[tuple[bytes, bytes]] | None = None) -> UpstreamCall:
    call = UpstreamCall(1, None, None)
    call.headers, call.trailers = headers or [(b":status", b"200")], trailers
    return call


def test_torchserve_s_status_is_read_as_a_status_code() -> None:
    assert _answered([(b"grpc-status", b"0")]).status() == (StatusCode.OK, "")
    assert _answered([(b"grpc-status", b"13"), (b"grpc-message", b"boom%20x")]).status() == (StatusCode.INTERNAL, "boom x")
    # A number no StatusCode has is UNKNOWN, as grpcio's clients read it.
    assert _answered([(b"grpc-status", b"42")]).status()[0] is StatusCode.UNKNOWN
    assert _answered([], [(b":status", b"200")]).status()[0] is StatusCode.UNKNOWN
    assert _answered([], [(b":status", b"502")]).status()[0] is StatusCode.INTERNAL


def test_torchserve_s_internal_for_an_unknown_model_still_reaches_the_client_as_not_found() -> None:
    said = [(b"grpc-status", b"13"), (b"grpc-message", b"ModelNotFoundException: m")]
    assert _whose_fault(said) == [(b"grpc-status", b"5"), (b"grpc-message", b"ModelNotFoundException: m")]
    other = [(b"grpc-status", b"13"), (b"grpc-message", b"boom")]
    assert _whose_fault(other) is other
