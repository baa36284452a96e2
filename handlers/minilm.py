"""Pure-PyTorch all-MiniLM-L6-v2 sentence embeddings.

Serving-time code: it imports only ``torch`` and the standard library so that a
TorchServe worker needs neither transformers, tokenizers nor numpy. Files are
produced at build time by ``tsfleet.build.minilm_export.export_minilm``.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CLS, SEP, PAD, UNK = "[CLS]", "[SEP]", "[PAD]", "[UNK]"
MAX_CHARS_PER_WORD = 100

ENCODER_KEYS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "vocab_size", "max_position_embeddings", "type_vocab_size", "layer_norm_eps",
)


# Unassigned code points (Cn) are kept, as the Rust tokenizer (AutoTokenizer) does.
_CONTROL_CATEGORIES = frozenset({"Cc", "Cf", "Co", "Cs"})


def _is_cjk(cp: int) -> bool:
    # BERT's "Chinese character" blocks. 0x2B920 (not Python BERT's 0x2B820) is what
    # the Rust tokenizer behind AutoTokenizer uses, and we match that one.
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
            or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F
            or 0x2B920 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


def _is_punct(ch: str) -> bool:
    # BERT treats all non-alphanumeric ASCII (e.g. "$", "^", "`") as punctuation too.
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


class _CharMap(dict):
    """``str.translate`` table computing BERT's per-character normalisation lazily.

    Each character maps to its cleaned, accent-stripped, lowercased form, with
    punctuation and CJK characters padded by spaces so that a plain
    ``str.split()`` yields BERT's basic tokens. Doing it per character (rather
    than ``text.lower()``) matches the Rust tokenizer, e.g. "Σ" -> "σ", never "ς".
    """

    def __init__(self, lowercase: bool) -> None:
        super().__init__()
        self.lowercase = lowercase

    def __missing__(self, cp: int) -> str:
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if ch in "\t\n\r" or cat == "Zs":
            out = " "
        elif cp == 0 or cp == 0xFFFD or cat in _CONTROL_CATEGORIES:
            out = ""
        else:
            s = ch
            if self.lowercase:  # strip_accents defaults to lowercase for uncased BERT
                s = "".join(c for c in unicodedata.normalize("NFD", s)
                            if unicodedata.category(c) != "Mn").lower()
            if _is_cjk(cp):
                out = f" {s} "
            else:
                out = "".join(f" {c} " if _is_punct(c) else c for c in s)
        self[cp] = out
        return out


class WordPieceTokenizer:
    """BERT BasicTokenizer + greedy longest-match WordPiece, ids identical to HF's."""

    def __init__(self, vocab: dict[str, int], lowercase: bool = True) -> None:
        self.vocab = vocab
        self.lowercase = lowercase
        self.cls_id, self.sep_id = vocab[CLS], vocab[SEP]
        self.pad_id, self.unk_id = vocab[PAD], vocab[UNK]
        self._charmap = _CharMap(lowercase)
        # Bounded cache: word frequencies are Zipfian, so a small cache hits often.
        self._word_ids = functools.lru_cache(maxsize=1 << 16)(self._wordpiece)

    @classmethod
    def from_file(cls, path: str | Path, lowercase: bool = True) -> "WordPieceTokenizer":
        """Build from a BERT ``vocab.txt`` (one token per line, id = line number)."""
        with open(path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        return cls(vocab, lowercase=lowercase)

    def basic_tokens(self, text: str) -> list[str]:
        """BERT basic tokens: cleaned, normalised, split on whitespace and punctuation."""
        return text.translate(self._charmap).split()

    def _wordpiece(self, word: str) -> tuple[int, ...]:
        if len(word) > MAX_CHARS_PER_WORD:
            return (self.unk_id,)
        vocab, ids, start, n = self.vocab, [], 0, len(word)
        while start < n:
            end = n
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                tid = vocab.get(piece)
                if tid is not None:
                    break
                end -= 1
            else:
                return (self.unk_id,)  # any unmatched remainder makes the whole word [UNK]
            ids.append(tid)
            start = end
        return tuple(ids)

    def token_ids(self, text: str) -> list[int]:
        """WordPiece ids of ``text`` without [CLS]/[SEP] and without truncation."""
        ids: list[int] = []
        for word in self.basic_tokens(text):
            ids.extend(self._word_ids(word))
        return ids

    def count_tokens(self, text: str, max_length: int | None = None) -> int:
        """Sequence length ``encode_batch`` would give ``text`` (specials included)."""
        n = len(self.token_ids(text)) + 2
        return n if max_length is None else min(n, max_length)

    def encode(self, text: str, max_length: int = 256) -> list[int]:
        """``[CLS] ids [SEP]`` truncated to ``max_length`` tokens in total."""
        ids = self.token_ids(text)[: max(max_length - 2, 0)]
        return [self.cls_id, *ids, self.sep_id]

    def encode_batch(self, texts: list[str], max_length: int = 256
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)``, int64 ``[B, T]``, right-padded to the longest."""
        seqs = [self.encode(t, max_length) for t in texts]
        width = max((len(s) for s in seqs), default=0)
        ids = [s + [self.pad_id] * (width - len(s)) for s in seqs]
        mask = [[1] * len(s) + [0] * (width - len(s)) for s in seqs]
        return (torch.tensor(ids, dtype=torch.long).reshape(len(seqs), width),
                torch.tensor(mask, dtype=torch.long).reshape(len(seqs), width))

    def encode_packed(self, texts: list[str], max_length: int = 256) -> "TokenBatch":
        """Every text's ``[CLS] ids [SEP]`` end to end, no padding (``MiniLMEncoder.forward_packed``)."""
        seqs = [self.encode(t, max_length) for t in texts]
        return TokenBatch(torch.tensor([i for s in seqs for i in s], dtype=torch.long), None,
                          [len(s) for s in seqs])


@dataclass
class TokenBatch:
    """Texts' tokens for the encoder: padded (``ids`` ``[B, T]`` with its ``mask``) or packed
    (``ids`` ``[N]``, every text's tokens end to end, ``mask`` None; ``lengths`` say where each
    ends). Packed, no work goes to padding: a quarter of a batch of short sentences
    (docs/benchmarks-peers.md)."""

    ids: torch.Tensor
    mask: torch.Tensor | None
    lengths: list[int]

    def to(self, device: torch.device | str) -> "TokenBatch":
        mask = None if self.mask is None else self.mask.to(device)
        return TokenBatch(self.ids.to(device), mask, self.lengths)


def _container(**modules: nn.Module) -> nn.Module:
    """A bare module holding children, only to reproduce HF's parameter names."""
    m = nn.Module()
    for name, child in modules.items():
        m.add_module(name, child)
    return m


class _Layer(nn.Module):
    """One post-LayerNorm BERT block, inference only (no dropout)."""

    def __init__(self, hidden: int, heads: int, inter: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.attention = _container(
            self=_container(query=nn.Linear(hidden, hidden), key=nn.Linear(hidden, hidden),
                            value=nn.Linear(hidden, hidden)),
            output=_container(dense=nn.Linear(hidden, hidden),
                              LayerNorm=nn.LayerNorm(hidden, eps=eps)))
        self.intermediate = _container(dense=nn.Linear(hidden, inter))
        self.output = _container(dense=nn.Linear(inter, hidden),
                                 LayerNorm=nn.LayerNorm(hidden, eps=eps))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, h = x.shape
        sa = self.attention.self

        def heads(lin: nn.Module) -> torch.Tensor:
            return lin(x).view(b, t, self.heads, h // self.heads).transpose(1, 2)

        ctx = F.scaled_dot_product_attention(heads(sa.query), heads(sa.key), heads(sa.value),
                                             attn_mask=mask)
        return self._after_attention(ctx.transpose(1, 2).reshape(b, t, h), x)

    def forward_packed(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """``x`` ``[N, hidden]``: texts' tokens end to end. The projections and the feed-forward
        see every real token once and no padding; attention runs per text, unmasked."""
        n, h = x.shape
        sa, d = self.attention.self, h // self.heads
        q, k, v = sa.query(x), sa.key(x), sa.value(x)
        ctx = []
        for qs, ks, vs in zip(q.split(lengths), k.split(lengths), v.split(lengths)):
            t = qs.shape[0]
            q1, k1, v1 = (z.view(1, t, self.heads, d).transpose(1, 2) for z in (qs, ks, vs))
            ctx.append(F.scaled_dot_product_attention(q1, k1, v1).transpose(1, 2).reshape(t, h))
        return self._after_attention(torch.cat(ctx) if ctx else x[:0], x)

    def _after_attention(self, ctx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ao = self.attention.output
        x = ao.LayerNorm(ao.dense(ctx) + x)
        y = self.output.dense(F.gelu(self.intermediate.dense(x)))  # exact erf GELU
        return self.output.LayerNorm(y + x)


class MiniLMEncoder(nn.Module):
    """BERT encoder whose state-dict names match Hugging Face ``BertModel`` (no pooler)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        c = {k: config[k] for k in ENCODER_KEYS}
        h, eps = c["hidden_size"], c["layer_norm_eps"]
        self.embeddings = _container(
            word_embeddings=nn.Embedding(c["vocab_size"], h),
            position_embeddings=nn.Embedding(c["max_position_embeddings"], h),
            token_type_embeddings=nn.Embedding(c["type_vocab_size"], h),
            LayerNorm=nn.LayerNorm(h, eps=eps))
        self.encoder = _container(layer=nn.ModuleList(
            _Layer(h, c["num_attention_heads"], c["intermediate_size"], eps)
            for _ in range(c["num_hidden_layers"])))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict`` but skips HF's pooler and position_ids buffer."""
        sd = {k: v for k, v in state_dict.items()
              if not k.startswith("pooler.") and k != "embeddings.position_ids"}
        return super().load_state_dict(sd, strict=strict, assign=assign)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return ``last_hidden_state`` ``[B, T, hidden]``; token types are all 0."""
        e = self.embeddings
        t = input_ids.shape[1]
        x = (e.word_embeddings(input_ids) + e.position_embeddings.weight[:t]
             + e.token_type_embeddings.weight[0])
        x = e.LayerNorm(x)
        # Skip the mask when nothing is padded: SDPA then takes its fastest path. Compiled,
        # the branch may not read the mask's values (that splits the graph, and each piece
        # compiles again for every new shape): a lone sequence is never padded, and a batch
        # of several always takes the mask.
        mask = None
        if input_ids.shape[0] > 1 if torch.compiler.is_compiling() else not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # True = may attend
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x

    def forward_packed(self, ids: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """``last_hidden_state`` of packed texts (``TokenBatch``): ``[N, hidden]``, each text's
        positions counted from its own start, as if it were alone."""
        e = self.embeddings
        n = torch.tensor(lengths, dtype=torch.long)
        starts = torch.repeat_interleave(n.cumsum(0) - n, n).to(ids.device)
        positions = torch.arange(ids.shape[0], device=ids.device) - starts
        x = e.word_embeddings(ids) + e.position_embeddings(positions) + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)
        for layer in self.encoder.layer:
            x = layer.forward_packed(x, lengths)
        return x


def mark_dynamic(*tensors: torch.Tensor) -> None:
    """Let ``torch.compile`` take the batch and sequence dimensions of these ``[B, T]`` inputs
    as dynamic from their first compile, so a compiled encoder warmed with one batch of one
    and one of several serves every length and batch size without compiling again. A
    dimension of 1 stays specialised (a lone text is its own graph). For a compiled model
    only: torch._dynamo, once imported, adds ~70 MiB to a worker that never compiles."""
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)
        torch._dynamo.maybe_mark_dynamic(t, 1)


def warmup_texts(tokenizer: "WordPieceTokenizer", n: int, text: str, max_length: int) -> list[str]:
    """``n`` texts of mixed lengths (so a batch of several is padded) for the load-time warm-up.

    Their padded length is never ``n``: compiling with dynamic shapes, torch takes two equal
    sizes for one symbol, and every later batch whose size differs from its length would
    compile again on a client's request.
    """
    texts = [text + " again" * ((n + i) % 7) for i in range(n)]
    for _ in range(8):  # bounded: a max_length of n would cut every longer text back to n
        if n == 1 or max(tokenizer.count_tokens(t, max_length) for t in texts) != n:
            break
        texts[0] += " again"
    return texts


def mean_pool_normalize(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over tokens then L2 normalisation (sentence-transformers' recipe)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(mean, p=2, dim=1)


def sentence_embeddings(encoder: nn.Module, batch: TokenBatch) -> torch.Tensor:
    """Normalised float32 embeddings ``[texts, hidden]`` of a padded or packed batch;
    ``encoder`` runs a padded one (it may be the compiled module), a packed one always runs
    the eager ``MiniLMEncoder.forward_packed`` (its per-text loop would compile per length)."""
    if batch.mask is not None:
        return mean_pool_normalize(encoder(batch.ids, batch.mask).float(), batch.mask)
    eager = getattr(encoder, "_orig_mod", encoder)
    if not batch.lengths:
        return torch.zeros(0, eager.embeddings.word_embeddings.embedding_dim, device=batch.ids.device)
    hidden = eager.forward_packed(batch.ids, batch.lengths).float()
    return F.normalize(torch.stack([part.mean(0) for part in hidden.split(batch.lengths)]), p=2, dim=1)


class MiniLM:
    """Tokenizer + encoder producing normalised all-MiniLM-L6-v2 sentence embeddings."""

    def __init__(self, tokenizer: WordPieceTokenizer, encoder: MiniLMEncoder,
                 max_seq_length: int = 256, device: str | torch.device = "cpu") -> None:
        self.tokenizer = tokenizer
        self.encoder = encoder.eval()
        self.max_seq_length = max_seq_length
        self.device = torch.device(device)

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> "MiniLM":
        """Load ``minilm_config.json``, ``vocab.txt`` and ``minilm.pt`` from ``model_dir``."""
        d = Path(model_dir)
        config = json.loads((d / "minilm_config.json").read_text(encoding="utf-8"))
        encoder = MiniLMEncoder(config)
        state = torch.load(d / "minilm.pt", weights_only=True, map_location=device)
        encoder.load_state_dict(state, strict=True)
        encoder.to(device)
        tokenizer = WordPieceTokenizer.from_file(d / "vocab.txt",
                                                 lowercase=config.get("do_lower_case", True))
        return cls(tokenizer, encoder, config.get("max_seq_length", 256), device)

    def batch(self, texts: list[str], max_length: int, padded: bool = False,
              compiled: bool = False) -> TokenBatch:
        """``texts`` tokenized for ``sentence_embeddings`` on the model's device: packed, or
        padded; for a compiled encoder its batch and length are dynamic (``mark_dynamic``:
        torch._dynamo, once touched, costs a worker ~70 MiB, so only then)."""
        if not padded:
            return self.tokenizer.encode_packed(texts, max_length).to(self.device)
        ids, mask = self.tokenizer.encode_batch(texts, max_length)
        lengths = mask.sum(1).tolist()  # on the host: no device sync per text
        ids, mask = ids.to(self.device), mask.to(self.device)
        if compiled:
            mark_dynamic(ids, mask)
        return TokenBatch(ids, mask, lengths)

    @property
    def dim(self) -> int:
        """Embedding width (384 for all-MiniLM-L6-v2)."""
        return self.encoder.embeddings.word_embeddings.embedding_dim

    def embed(self, texts: list[str], max_length: int | None = None,
              batch_size: int = 64) -> torch.Tensor:
        """Embed ``texts``; ``[len(texts), dim]`` float32 on the model's device, input order.

        ``max_length`` defaults to the model's ``max_seq_length`` (256). Texts run in
        chunks of ``batch_size``, grouped by length so little compute goes to padding.
        """
        max_length = max_length or self.max_seq_length
        out = torch.empty(len(texts), self.dim, device=self.device)
        order = sorted(range(len(texts)),
                       key=lambda i: self.tokenizer.count_tokens(texts[i], max_length))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                ids, mask = self.tokenizer.encode_batch([texts[i] for i in idx], max_length)
                ids, mask = ids.to(self.device), mask.to(self.device)
                out[torch.tensor(idx, device=self.device)] = mean_pool_normalize(
                    self.encoder(ids, mask), mask).float()
        return out
