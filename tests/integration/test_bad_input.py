"""Bad input gets a clear 4xx naming the model, version and problem; the fleet keeps serving."""
from __future__ import annotations

import io

import pytest
from PIL import Image

from benchmarks.isolation.bodies import png_header_only, truncated_png


TEXT = "text-embedder"
IMAGE = "image-classifier"
CASES = [
    # id, model, body, content type, status, words the message must contain
    ("malformed-json", TEXT, b'{"text": "hi"', "application/json", 400, "malformed JSON"),
    ("wrong-field", TEXT, b'{"txt": "hi"}', "application/json", 400, "unknown field(s) 'txt'"),
    ("json-not-object", TEXT, b'[1, 2]', "application/json", 400, "expected a JSON object"),
    ("text-not-string", TEXT, b'{"text": 42}', "application/json", 400, "must be a non-empty string"),
    ("empty-text", TEXT, b'{"text": "   "}', "application/json", 400, "text is empty"),
    ("empty-list", TEXT, b'{"text": []}', "application/json", 400, "non-empty"),
    ("one-mb-text", TEXT, ('{"text": "%s"}' % ("a" * 2**20)).encode(), "application/json", 413, "limit is 20000"),
    ("too-many-texts", TEXT, ('{"text": [%s]}' % ",".join(['"a"'] * 65)).encode(), "application/json", 413, "65 texts"),
    ("non-utf8-json", TEXT, b'{"text": "\xff\xfe"}', "application/json", 400, "not valid UTF-8"),
    ("non-utf8-text", TEXT, b"\xff\xfe\xfd", "text/plain", 400, "not valid UTF-8"),
    ("empty-body", TEXT, b"", "application/json", 400, "empty"),
    ("wrong-content-type", TEXT, b"\x89PNG....", "image/png", 415, "content type 'image/png'"),
    ("form-encoded", TEXT, b'{"text": "hi"}', "application/x-www-form-urlencoded", 415, "Content-Type"),
    ("not-an-image", IMAGE, b"hello, I am text", "image/png", 400, "not a PNG or JPEG"),
    ("text-to-image", IMAGE, b"hello", "text/plain", 415, "not accepted"),
    ("truncated-png", IMAGE, truncated_png(), "image/png", 400, "truncated or corrupt"),
    ("decompression-bomb", IMAGE, png_header_only(20000, 20000), "image/png", 413, "pixels"),
    ("gif", IMAGE, b"GIF89a....", "image/gif", 415, "image/gif"),
    ("bad-base64", IMAGE, b'{"image": "***"}', "application/json", 400, "not valid base64"),
    ("empty-image", IMAGE, b"", "image/png", 400, "empty"),
]


@pytest.mark.parametrize("model,body,ctype,status,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_4xx(client, model, body, ctype, status, words) -> None:
    resp = client.predict(model, body, content_type=ctype)
    assert resp.status_code == status, resp.text
    doc = resp.json()
    assert doc["code"] == status
    assert doc["message"].startswith(f"{model} 1.0: "), doc
    assert words in doc["message"], doc


def test_unknown_model_and_version_are_404(client) -> None:
    assert client.predict("no-such-model", {"text": "hi"}).status_code == 404
    resp = client.predict("text-embedder", {"text": "hi"}, version="9.9")
    assert resp.status_code == 404 and "9.9" in resp.json()["message"]


@pytest.mark.parametrize("key", [None, "wrong"])
def test_missing_or_wrong_token_is_refused(client, key) -> None:
    headers = {"Authorization": "Bearer not-the-key"} if key == "wrong" else {}
    resp = client.predict("text-embedder", {"text": "hi"}, key=None, headers=headers)
    assert resp.status_code in (400, 401)
    assert "Token Authorization failed" in resp.json()["message"]
    # The management key is not an inference key either.
    assert client.predict("text-embedder", {"text": "hi"}, key="management").status_code in (400, 401)


def test_fleet_still_serves_every_model_after_bad_input(client) -> None:
    for _, model, body, ctype, _, _ in CASES:
        client.predict(model, body, content_type=ctype)
    assert client.predict("text-embedder", {"text": "still here"}).status_code == 200
    assert client.predict("intent-classifier", {"text": "hi there, how are you"}).json()["intent"] == "greeting"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(buf, format="PNG")
    assert client.predict("image-classifier", buf.getvalue(), content_type="image/png").status_code == 200
    assert client.post("/wfpredict/intent-pipeline", {"text": "cancel my order"}).json()["intent"] == "cancel"
