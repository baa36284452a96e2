"""The one routing policy both fronts follow, and the two mappings of TorchServe's answers to it."""
from __future__ import annotations

import json

import pytest
from grpc import StatusCode

from tsfleet.router.fronts.grpc_predict import outcome as grpc_outcome
from tsfleet.router.fronts.rest import _for_client
from tsfleet.router.fronts.rest import _outcome as rest_outcome
from tsfleet.router.keys import REFUSED
from tsfleet.router.policy.attempts import (ANSWER, CLIENT_FAULT, DROPPED, KEY_REFUSED, NOT_FOUND, OK, RENEW, RETRY,
                                            SERVER_FAULT, RoutingPolicy)
from tsfleet.router.policy.routing import Route, RoutingTable
from tsfleet.router.wire.http1_messages import Response


def policy(shadow: str | None = None, backlog: int = 256) -> RoutingPolicy:
    route = Route("m", "1.0", {"1.0": 50.0, "1.1": 50.0}, shadow=shadow, shadow_share=1.0 if shadow else 0.0)
    return RoutingPolicy(RoutingTable({"m": route}), shadow_backlog=backlog)


def test_a_dropped_request_on_the_candidate_is_retried_once_on_the_baseline_and_both_are_recorded() -> None:
    p = policy()
    call = p.begin("m", None, None)
    assert call.version == "1.1"  # round robin starts on the candidate (ties: the higher version)
    assert p.after(call, DROPPED) == RETRY and call.version == "1.0"
    assert p.after(call, DROPPED) == ANSWER  # once: the second failure is the client's answer
    p.answered(call, DROPPED)
    stats = p.table.stats
    assert (stats[("m", "1.1")].requests, stats[("m", "1.1")].errors) == (1, 1)
    assert (stats[("m", "1.0")].requests, stats[("m", "1.0")].errors, stats[("m", "1.0")].retries) == (1, 1, 1)


def test_a_version_the_client_named_is_retried_on_itself() -> None:
    p = policy()
    call = p.begin("m", "1.1", None)
    assert p.after(call, DROPPED) == RETRY and call.version == "1.1"


def test_a_refused_key_is_renewed_once_then_answered_and_counts_as_the_arm_working() -> None:
    p = policy()
    call = p.begin("m", "1.0", None)
    assert [p.after(call, KEY_REFUSED), p.after(call, KEY_REFUSED)] == [RENEW, ANSWER]
    p.answered(call, KEY_REFUSED)
    assert (p.table.stats[("m", "1.0")].requests, p.table.stats[("m", "1.0")].errors) == (1, 0)


@pytest.mark.parametrize("outcome, errors", [(OK, 0), (CLIENT_FAULT, 0), (SERVER_FAULT, 1)])
def test_an_answer_is_recorded_on_the_arm_that_gave_it(outcome: int, errors: int) -> None:
    p = policy()
    call = p.begin("m", "1.0", None)
    assert p.after(call, outcome) == ANSWER
    p.answered(call, outcome)
    assert (p.table.stats[("m", "1.0")].requests, p.table.stats[("m", "1.0")].errors) == (1, errors)


def test_a_model_or_version_that_does_not_exist_leaves_no_series_behind() -> None:
    p = policy()
    call = p.begin("made-up", "9.9", None)
    p.answered(call, NOT_FOUND)
    assert p.table.stats == {}


@pytest.mark.parametrize("outcome, mirrored", [(OK, True), (CLIENT_FAULT, True), (SERVER_FAULT, False),
                                               (DROPPED, False), (NOT_FOUND, False)])
def test_a_shadow_gets_what_the_baseline_answered_never_its_failures(outcome: int, mirrored: bool) -> None:
    p = policy(shadow="1.1")
    p.table.set_weights("m", {"1.0": 100.0, "1.1": 0.0})
    call = p.begin("m", None, None)
    assert (p.answered(call, outcome) == "1.1") is mirrored
    assert p.shadows == mirrored


def test_shadows_in_flight_are_capped_and_each_one_done_frees_its_place() -> None:
    p = policy(shadow="1.1", backlog=2)
    p.table.set_weights("m", {"1.0": 100.0, "1.1": 0.0})
    sent = [p.answered(p.begin("m", None, None), OK) for _ in range(3)]
    assert sent == ["1.1", "1.1", None]
    p.shadow_done("m", "1.1", OK, b'{"a": [1.0, 2.0]}', b'{"a": [1.0, 2.0]}')
    p.shadow_done("m", "1.1", OK, b'{"a": [1.0, 2.0]}', b'{"a": [9.0, 2.0]}')
    assert p.shadows == 0 and p.answered(p.begin("m", None, None), OK) == "1.1"
    st = p.table.stats[("m", "1.1")]
    assert (st.shadow_requests, st.shadow_errors, st.shadow_disagreements) == (2, 0, 1)


def test_a_shadow_that_fails_is_an_error_and_is_not_compared() -> None:
    p = policy(shadow="1.1")
    p.answered(p.begin("m", "1.0", None), OK)
    p.shadow_done("m", "1.1", SERVER_FAULT, b"{}", None)
    st = p.table.stats[("m", "1.1")]
    assert (st.shadow_requests, st.shadow_errors, st.shadow_disagreements) == (1, 1, 0)


# The same answer from TorchServe, over REST and over gRPC, means the same to the policy.
SAME_ANSWER = [
    ((200, b"[0.1]"), (StatusCode.OK, ""), OK),
    ((400, b'{"code": 400, "message": "bad input"}'), (StatusCode.INVALID_ARGUMENT, "bad input"), CLIENT_FAULT),
    ((404, b'{"code": 404, "type": "ModelNotFoundException"}'),
     (StatusCode.INTERNAL, "Model not found org.pytorch.serve.archive.model.ModelNotFoundException"), NOT_FOUND),
    ((500, b'{"code": 500, "message": "boom"}'), (StatusCode.INTERNAL, "boom org.pytorch.serve.SomeException"),
     SERVER_FAULT),
    ((503, b'{"code": 503, "message": "Worker died."}'), (StatusCode.INTERNAL, "Worker died. org.pytorch.serve.X"),
     DROPPED),
    ((503, b'{"message": "Model m has no worker to serve inference request"}'),
     (StatusCode.UNAVAILABLE, "Model m has no worker to serve inference request org.pytorch.serve.X"), DROPPED),
    ((507, b'{"message": "Worker died."}'), (StatusCode.RESOURCE_EXHAUSTED, "Worker died. org.pytorch.serve.X"),
     DROPPED),
    ((400, b'{"message": "' + REFUSED.encode() + b'"}'), (StatusCode.PERMISSION_DENIED, REFUSED + " org.pytorch.serve.X"),
     KEY_REFUSED),
]


@pytest.mark.parametrize("rest, grpc, expected", SAME_ANSWER)
def test_rest_and_grpc_map_the_same_answer_to_the_same_outcome(rest: tuple[int, bytes], grpc: tuple[StatusCode, str],
                                                               expected: int) -> None:
    assert rest_outcome(Response(rest[0], rest[1], []), True) == expected
    assert grpc_outcome(*grpc) == expected


def test_no_answer_at_all_is_a_dropped_request_on_both_fronts() -> None:
    assert rest_outcome(None, False) == DROPPED
    assert grpc_outcome(StatusCode.UNAVAILABLE, "TorchServe is not reachable at 127.0.0.1:7070: refused") == DROPPED


def test_a_key_refusal_is_the_client_s_answer_when_the_key_was_the_client_s_own() -> None:
    assert rest_outcome(Response(400, REFUSED.encode(), []), False) == CLIENT_FAULT


def test_a_form_torchserve_could_not_read_is_the_client_s_fault_and_its_400() -> None:
    said = (b'{"code": 500, "type": "ErrorDataDecoderException", '
            b'"message": "java.lang.IllegalArgumentException: unfinished escape sequence"}')
    resp = Response(500, said, [])
    assert rest_outcome(resp, True) == CLIENT_FAULT
    answer = _for_client(resp)
    assert answer.status == 400 and json.loads(answer.body) == {
        "code": 400, "type": "BadRequest",
        "message": "the form body could not be read: java.lang.IllegalArgumentException: unfinished escape sequence"}
    other = Response(500, b'{"code": 500, "type": "InternalServerError", "message": "boom"}', [])
    assert rest_outcome(other, True) == SERVER_FAULT and _for_client(other) is other


def test_a_client_s_long_made_up_model_names_are_not_kept_by_the_router() -> None:
    from tsfleet.router.fronts.rest import _quoted, _quoted_short

    before = _quoted_short.cache_info().currsize
    assert _quoted("m" * 60_000 + "/") == "m" * 60_000 + "%2F"
    assert _quoted_short.cache_info().currsize == before
    assert _quoted("text-embedder") == "text-embedder"
    assert _quoted_short.cache_info().currsize <= before + 1
