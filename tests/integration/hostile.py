"""Hostile request bodies for the property tier, and a sender that puts one beside
well-formed requests so that TorchServe batches them together.

The strategies aim at what a parser meets from a hostile client: JSON of any shape and
depth, numbers past any limit, lone surrogates and bytes that are not UTF-8, wrong and
missing content types, truncated, corrupt and oversized images, and random bytes.
"""
from __future__ import annotations

import base64
import io
import json
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import requests
from hypothesis import strategies as st

from benchmarks.isolation.bodies import FORM, IMAGE, INTENT, JSON, TEXT, good_requests, png_header_only
from handlers.shapes import draw_shape
from tsfleet.router.proto import inference_pb2 as pb
from tsfleet.router.proto import inference_pb2_grpc as pb_grpc

WORKFLOW = "intent-pipeline"
TARGETS = (TEXT, INTENT, IMAGE, WORKFLOW)
CONTENT_TYPES = (JSON, "text/plain", "", "image/png", "image/jpeg", "application/octet-stream", FORM,
                 "multipart/form-data; boundary=x", "application/json; charset=utf-16", "text/html",
                 "application/problem+json", "image/gif")
FIELDS = ("text", "embedding", "embeddings", "image", "b64")

# --------------------------------------------------------------------------- strategies
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=10**35, max_value=10**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40), st.text(st.characters(categories=["Cs", "Co", "Cc", "Zs"]), max_size=8),
)
_keys = st.one_of(st.sampled_from(FIELDS), st.text(max_size=10))
json_docs = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_keys, inner, max_size=4), max_leaves=40)


@st.composite
def json_bodies(draw: Any) -> bytes:
    """A JSON document of any shape, written as a client might: ASCII-escaped or raw (where a
    lone surrogate becomes bytes that are not UTF-8), often under a field the models know."""
    doc = draw(json_docs)
    if draw(st.booleans()):
        doc = {draw(st.sampled_from(FIELDS)): doc}
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))  # NaN and Infinity as Python writes them
    return text.encode("utf-8", "surrogatepass")


@st.composite
def deep_bodies(draw: Any) -> bytes:
    levels = draw(st.integers(min_value=1, max_value=5000))
    opening, closing = draw(st.sampled_from([(b"[", b"]"), (b'{"text": ', b"}"), (b'{"a":[', b"]}")]))
    inner = draw(st.sampled_from([b"", b"1", b'"x"', b"[]"]))
    body = opening * levels + inner + closing * levels
    return (b'{"text": ' + body + b"}") if draw(st.booleans()) else body


@st.composite
def number_bodies(draw: Any) -> bytes:
    digits = draw(st.integers(min_value=1, max_value=200_000))
    number = draw(st.sampled_from([b"", b"-"])) + b"9" * digits + draw(st.sampled_from([b"", b".5", b"e999", b"e-999"]))
    field = draw(st.sampled_from([b"text", b"embedding", b"image"]))
    # Many numbers, up to about 4 MB in all: past that the body tests TorchServe's size cap.
    count = draw(st.integers(1, max(1, min(400, 4_000_000 // len(number)))))
    return b'{"%s": ' % field + (b"[" + b",".join([number] * count) + b"]" if draw(st.booleans()) else number) + b"}"


@st.composite
def text_bodies(draw: Any) -> bytes:
    """The text models' own fields with values past their limits or of the wrong kind."""
    texts = draw(st.one_of(
        st.text(max_size=30), st.text(min_size=1, max_size=8).map(lambda t: t * (20_001 // len(t) + 1)),
        st.lists(st.text(min_size=1, max_size=5), min_size=60, max_size=70), st.lists(json_docs, max_size=3),
        st.lists(st.floats(allow_nan=True), min_size=380, max_size=390).map(lambda v: {"embedding": v})))
    doc = texts if isinstance(texts, dict) else {"text": texts}
    return json.dumps(doc, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


@st.composite
def image_bodies(draw: Any) -> bytes:
    """Truncated, corrupted and oversized PNG and JPEG images, raw or as base64 JSON."""
    kind = draw(st.sampled_from(["truncated", "corrupt", "bomb", "b64"]))
    if kind == "bomb":
        return png_header_only(draw(st.integers(1, 70_000)), draw(st.integers(1, 70_000)))
    img = draw_shape(draw(st.sampled_from(["circle", "square", "triangle"])), random.Random(draw(st.integers(0, 99))))
    buf = io.BytesIO()
    img.save(buf, format=draw(st.sampled_from(["PNG", "JPEG"])))
    data = buf.getvalue()
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    if kind == "corrupt":
        at = draw(st.integers(0, len(data) - 1))
        return data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at + 1:]
    encoded = base64.b64encode(data)
    cut = draw(st.integers(0, len(encoded)))
    return b'{"image": "' + encoded[:cut] + draw(st.sampled_from([b"", b"*", b"==", b"\\u0000"])) + b'"}'


hostile_bodies = st.one_of(json_bodies(), deep_bodies(), number_bodies(), text_bodies(), image_bodies(),
                           st.binary(max_size=2048), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))


# --------------------------------------------------------------------------- sending
@dataclass(frozen=True)
class Answer:
    """One request's outcome: the HTTP status (or gRPC code name), its body, and how many
    requests its batch held (the handler's X-Batch-Size header; REST only)."""

    status: int | str
    body: bytes
    batch: int = 0

    def json(self) -> Any:
        return json.loads(self.body)


class Sender:
    """Sends to one path (TorchServe or the router, REST or gRPC) from a small thread pool,
    one hostile request at once with ``good`` well-formed ones."""

    def __init__(self, rest_url: str | None, grpc_target: str | None, key: str, good: int = 3):
        self.rest_url, self.key, self.good = rest_url, key, good
        self.pool = ThreadPoolExecutor(max_workers=good + 1)
        self.local = threading.local()
        self.channel = grpc.insecure_channel(grpc_target) if grpc_target else None
        self.stub = pb_grpc.InferenceAPIsServiceStub(self.channel) if self.channel else None

    def close(self) -> None:
        self.pool.shutdown()
        if self.channel:
            self.channel.close()

    def rest(self, target: str, body: bytes, content_type: str) -> Answer:
        session = getattr(self.local, "session", None) or requests.Session()
        self.local.session = session
        path = f"/wfpredict/{target}" if target == WORKFLOW else f"/predictions/{target}"
        headers = {"Authorization": f"Bearer {self.key}"}
        if content_type:
            headers["Content-Type"] = content_type
        resp = session.post(self.rest_url + path, data=body, headers=headers, timeout=60)
        return Answer(resp.status_code, resp.content, int(resp.headers.get("X-Batch-Size", 0)))

    def grpc_call(self, target: str, body: bytes, content_type: str) -> Answer:
        assert self.stub is not None
        try:
            reply = self.stub.Predictions(pb.PredictionsRequest(model_name=target, input={"data": body}),
                                          metadata=(("authorization", f"Bearer {self.key}"),), timeout=60)
            return Answer("OK", reply.prediction)
        except grpc.RpcError as err:
            return Answer(err.code().name, (err.details() or "").encode())

    def mix(self, target: str, body: bytes, content_type: str) -> tuple[Answer, list[tuple[Answer, str]]]:
        """The hostile request's answer and each well-formed one's (with what it must say)."""
        send: Callable[[str, bytes, str], Answer] = self.rest if self.rest_url else self.grpc_call
        model = INTENT if target == WORKFLOW else target
        goods = good_requests(model, self.good)
        futures = [self.pool.submit(send, target, body, content_type)]
        futures += [self.pool.submit(send, target, good_body, ctype) for ctype, good_body, _ in goods]
        answers = [f.result() for f in futures]
        return answers[0], [(a, want) for a, (_, _, want) in zip(answers[1:], goods)]
